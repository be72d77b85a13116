"""register against a real `mlflow server` (sqlite + proxied artifacts) on 127.0.0.1: what lands there, racing
promotions, and an outage in the middle of a registration."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from unit.test_register import FAST, cfg_for, do_register, make_run, runs_with_key

from kubetune import tracking

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


def test_a_registration_lands_on_the_server(server, tmp_path, monkeypatch):
    run = make_run(tmp_path, "srv", eval_loss=1.1)
    cfg = cfg_for(server.uri, "kt-server", tmp_path)
    reg = do_register(cfg, run, tmp_path / "registered")
    assert reg["status"] == "registered" and reg["tracking_uri"] == server.uri
    assert reg["promotion"] == "promoted" and reg["version"] == "1" and reg["champion_version"] == "1"

    c = tracking.client(server.uri)
    r = c.get_run(reg["run_id"])
    assert r.data.metrics["eval_loss"] == 1.1 and r.data.metrics["base_eval_loss"] == 3.0
    assert r.data.metrics["train_tokens_per_second"] == 42.5
    assert len(c.get_metric_history(reg["run_id"], "train_loss")) == 3
    assert r.data.params["lora.r"] == "16" and len(r.data.params) == len(cfg.flat())
    assert r.data.tags[tracking.TAG_PROMOTION] == "promoted"
    assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server, not a local path
    names = {f.path for f in c.list_artifacts(reg["run_id"], "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/base_model.json", "adapter/adapter_config.json"} <= names
    assert {f.path for f in c.list_artifacts(reg["run_id"], "eval")} >= {"eval/metrics.json", "eval/eval_report.md"}
    got = Path(c.download_artifacts(reg["run_id"], "adapter/adapter_model.safetensors", str(tmp_path)))
    assert got.read_bytes() == b"weights of srv"
    assert {d.dataset.digest for d in r.inputs.dataset_inputs} == {"data-fp-1"}

    mv = c.get_model_version("kt-server", "1")
    assert mv.tags[tracking.TAG_PROMOTION] == "promoted" and "beats the base model" in mv.tags[tracking.TAG_REASON]
    assert mv.tags[tracking.TAG_DATA_FINGERPRINT] == "data-fp-1" and mv.tags[tracking.TAG_BASE_MODEL]
    assert str(c.get_registered_model("kt-server").aliases["champion"]) == "1"
    # The champion can be fetched by alias: the version's runs:/ source resolves through the server.
    import mlflow.artifacts

    monkeypatch.chdir(tmp_path)  # MLflow creates ./mlflow.db when it falls back to its default store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # how a reader (a serving job) is configured
    fetched = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/kt-server@champion", tracking_uri=server.uri, dst_path=str(tmp_path / "dl")
        )
    )
    assert json.loads((fetched / "base_model.json").read_text())["name_or_path"] == "org/Tiny-Model"
    assert not (tmp_path / "mlflow.db").exists()


def _race(
    server,
    tmp_path: Path,
    model: str,
    losses: dict[str, float],
    *,
    hold: dict[str, float] | None = None,
    monkeypatch=None,
) -> dict[str, dict]:
    """Register several adapters at the same moment from threads; with ``hold``, every racer decides against
    the same (empty) champion, then waits ``hold[name]`` s before moving the alias."""
    runs = {n: make_run(tmp_path, n, eval_loss=loss) for n, loss in losses.items()}
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(runs))
    if hold is not None:
        decided = threading.Barrier(len(runs))
        real = tracking.decide

        def slow_decide(eval_loss, *a, **k):
            out = real(eval_loss, *a, **k)
            decided.wait(timeout=60)
            name = next(n for n, loss in losses.items() if loss == eval_loss)
            time.sleep(hold[name])
            return out

        monkeypatch.setattr(tracking, "decide", slow_decide)

    def go(name: str) -> None:
        try:
            start.wait(timeout=60)
            results[name] = do_register(cfg_for(server.uri, model, tmp_path), runs[name], tmp_path / f"reg-{name}")
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(n,)) for n in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_racing_promotions_end_on_the_better_version(server, tmp_path, monkeypatch):
    # The worst interleaving: both racers compare with the base model (no champion yet), the better one moves the
    # alias and finishes, then the worse one overwrites it. Convergence must put it back.
    res = _race(
        server,
        tmp_path,
        "kt-race",
        {"better": 0.6, "worse": 0.9},
        hold={"better": 0.0, "worse": 1.5},
        monkeypatch=monkeypatch,
    )
    c = tracking.client(server.uri)
    better_v, worse_v = res["better"]["version"], res["worse"]["version"]
    assert str(c.get_registered_model("kt-race").aliases["champion"]) == better_v
    assert res["worse"]["promotion"] == "rejected" and res["worse"]["champion_version"] == better_v
    assert "lost a concurrent promotion" in res["worse"]["promotion_reason"]
    assert c.get_model_version("kt-race", worse_v).tags[tracking.TAG_PROMOTION] == "rejected"
    assert c.get_run(res["worse"]["run_id"]).data.tags[tracking.TAG_PROMOTION] == "rejected"
    assert c.get_model_version("kt-race", better_v).tags[tracking.TAG_PROMOTION] == "promoted"


def test_simultaneous_registrations_agree_on_the_champion(server, tmp_path):
    res = _race(server, tmp_path, "kt-race2", {"r1": 0.9, "r2": 0.5, "r3": 0.7})
    c = tracking.client(server.uri)
    best = res["r2"]["version"]
    assert str(c.get_registered_model("kt-race2").aliases["champion"]) == best
    assert res["r2"]["promotion"] == "promoted"
    # The others are rejected, unless one held the alias first and the best then beat it fairly (it compared
    # itself with that one): such a version stays `promoted`, as a champion replaced later does. (Each racer's
    # registration.json is its view when it finished; MLflow's tags are the final word.)
    replaced = set()
    mv = c.get_model_version("kt-race2", best)
    while (prev := mv.tags.get(tracking.TAG_BASELINE)) not in (None, "base"):
        replaced.add(prev)
        mv = c.get_model_version("kt-race2", prev)
    for name in ("r1", "r3"):
        version = res[name]["version"]
        tag = c.get_model_version("kt-race2", version).tags[tracking.TAG_PROMOTION]
        assert tag == ("promoted" if version in replaced else "rejected"), (name, version, replaced)


def test_a_server_that_dies_mid_registration_loses_nothing(server, tmp_path, monkeypatch, caplog):
    run = make_run(tmp_path, "outage", eval_loss=1.0)
    cfg = cfg_for(server.uri, "kt-outage", tmp_path)
    real_upload = tracking._log_artifacts

    def die_then_upload(*a, **k):  # the run exists and its metrics are in; the server goes away before artifacts
        server.stop()
        return real_upload(*a, **k)

    monkeypatch.setattr(tracking, "_log_artifacts", die_then_upload)
    started = time.monotonic()
    pending = do_register(cfg, run, tmp_path / "out", retry=FAST)
    assert time.monotonic() - started < 30
    monkeypatch.setattr(tracking, "_log_artifacts", real_upload)
    assert pending["status"] == "pending" and pending["run_id"]
    assert "unreachable" in caplog.text
    assert (tmp_path / "out" / "outbox.json").is_file()

    server.start()
    reg = do_register(cfg, run, tmp_path / "out")
    assert reg["status"] == "registered" and reg["run_id"] == pending["run_id"]
    assert reg["promotion"] == "promoted" and reg["champion_version"] == reg["version"] == "1"
    assert len(runs_with_key(server.uri, "exp-kt-outage", "adapter-outage")) == 1
    c = tracking.client(server.uri)
    r = c.get_run(reg["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.metrics["eval_loss"] == 1.0 and r.data.metrics["train_tokens_per_second"] == 42.5
    assert len(c.get_metric_history(reg["run_id"], "train_loss")) == 3  # sent once, not twice
    assert {f.path for f in c.list_artifacts(reg["run_id"], "adapter")} >= {"adapter/adapter_model.safetensors"}
    assert not (tmp_path / "out" / "outbox.json").exists()
    assert do_register(cfg, run, tmp_path / "out") == reg  # up to date now
