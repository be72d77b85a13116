"""register against a local sqlite MLflow store: the run, the version, the promotion gate, idempotence, the outbox."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from kubetune import register, tracking
from kubetune.artifacts import stage_output, write_json
from kubetune.config import from_dict

FAST = tracking.Retry(attempts=2, base_delay_s=0.01, max_delay_s=0.02, deadline_s=5.0, request_timeout_s=2)


def make_run(
    root: Path,
    name: str,
    *,
    eval_loss: float,
    base_eval_loss: float = 3.0,
    data_fp: str = "data-fp-1",
    merged: bool = False,
) -> dict[str, Path]:
    """Stage folders as prepare/pack/train/evaluate write them (no model needed: register only reads files)."""
    root.mkdir(parents=True, exist_ok=True)
    prepared, packed, adapter, ev = (root / f"{name}-{s}" for s in ("prepared", "packed", "adapter", "eval"))
    conv = {
        "id": "a1",
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "source": "data.jsonl",
        "row": 1,
        "format": "messages",
    }
    if not prepared.exists():
        with stage_output(prepared, "prepare", data_fp, inputs={}, config={}) as w:
            (w.tmp / "train.jsonl").write_text(json.dumps(conv) + "\n" + json.dumps({**conv, "row": 2}) + "\n")
            (w.tmp / "eval.jsonl").write_text(json.dumps({**conv, "row": 3}) + "\n")
            write_json(w.tmp / "data_report.json", {"rows": 3})
            (w.tmp / "data_report.md").write_text("# Data report\n")
            w.counts = {"train_rows": 2, "eval_rows": 1}
    with stage_output(packed, "pack", f"pack-{name}", inputs={}, config={}) as w:
        write_json(w.tmp / "pack_report.json", {"packing_efficiency": 0.9})
        (w.tmp / "pack_report.md").write_text("# Pack report\n")
        w.counts = {"train_rows": 1, "packing_efficiency": 0.9}
    with stage_output(adapter, "train", f"adapter-{name}", inputs={}, config={}) as w:
        (w.tmp / "adapter_model.safetensors").write_bytes(b"weights of " + name.encode())
        write_json(w.tmp / "adapter_config.json", {"peft_type": "LORA", "r": 16})
        write_json(w.tmp / "tokenizer_config.json", {})
        write_json(
            w.tmp / "base_model.json",
            {
                "name_or_path": "org/Tiny-Model",
                "revision": "main",
                "resolved_path": "org/Tiny-Model",
                "weights_sha256": "ab" * 32,
                "local": False,
            },
        )
        write_json(
            w.tmp / "training_summary.json",
            {
                "global_step": 3,
                "max_steps": 3,
                "resumed_from_step": None,
                "tokens_seen": 300,
                "train_tokens_per_second": 42.5,
                "train_seconds": 7.0,
                "peak_rss_bytes": 1 << 30,
                "loss_curve": [[1, 3.2], [2, 2.1], [3, 1.7]],
                "final_loss": 1.7,
                "settings": {},
                "method": "lora",
                "world_size": 2,
                "backend": "gloo",
                "strategy": "fsdp",
                "tokens_per_second_per_rank": [21.5, 21.0],
                "collective_seconds_per_step": 0.004,
                "allreduce_bytes_per_step": 92480,
                "allgather_bytes_per_step": 1948928,
            },
        )
        (w.tmp / "config.yaml").write_text("method: lora\n")
        if merged:
            (w.tmp / "merged").mkdir()
            write_json(w.tmp / "merged" / "config.json", {"model_type": "llama"})
    inputs = {
        "prepared": {"path": str(prepared), "fingerprint": data_fp},
        "packed": {"path": str(packed), "fingerprint": f"pack-{name}"},
        "adapter": {"path": str(adapter), "fingerprint": f"adapter-{name}"},
    }
    with stage_output(ev, "evaluate", f"eval-{name}-{eval_loss}", inputs=inputs, config={}) as w:
        write_json(
            w.tmp / "metrics.json",
            {
                "eval_loss": eval_loss,
                "base_eval_loss": base_eval_loss,
                "eval_loss_delta": eval_loss - base_eval_loss,
                "eval_perplexity": 2.0,
                "base_eval_perplexity": 20.0,
                "exact_match": 0.5,
                "base_exact_match": 0.0,
                "rouge_l": 0.7,
                "base_rouge_l": 0.1,
                "eval_rows": 4,
                "eval_tokens": 40,
                "generation_rows": 2,
            },
        )
        (w.tmp / "eval_report.md").write_text(f"# Evaluation of {name}\n")
        (w.tmp / "samples.jsonl").write_text("{}\n")
    return {"prepared": prepared, "packed": packed, "adapter": adapter, "eval": ev, "root": root}


def cfg_for(uri: str, model: str, tmp: Path, **tracking_cfg):
    return from_dict(
        {
            "model": {"name_or_path": "org/Tiny-Model"},
            "output_dir": str(tmp),
            "tracking": {"uri": uri, "experiment": f"exp-{model}", "registered_model": model, **tracking_cfg},
        }
    )


def do_register(cfg, run: dict[str, Path], out: Path, **kw) -> dict:
    register.register(
        cfg,
        run["adapter"],
        run["eval"],
        out,
        prepared=run["prepared"],
        packed=run["packed"],
        retry=kw.pop("retry", FAST),
        **kw,
    )
    return json.loads((out / "registration.json").read_text())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs seconds); tests use their own model names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def runs_with_key(uri: str, experiment: str, key: str) -> list:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_RUN_KEY}` = '{key}'")


# --------------------------------------------------------------------------------------------------------------


def test_first_version_beating_the_base_is_promoted_with_everything_logged(store, tmp_path):
    run = make_run(tmp_path, "a", eval_loss=1.25, merged=True)
    cfg = cfg_for(store, "m-first", tmp_path)
    reg = do_register(cfg, run, tmp_path / "registered")
    assert reg["status"] == "registered"
    assert reg["promotion"] == "promoted" and reg["version"] == "1" and reg["champion_version"] == "1"
    assert reg["model_name"] == "m-first" and reg["tracking_uri"] == store and reg["experiment"] == "exp-m-first"
    assert "1.2500 beats the base model (3.0000) by 1.7500" in reg["promotion_reason"]

    c = tracking.client(store)
    r = c.get_run(reg["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.metrics["eval_loss"] == 1.25 and r.data.metrics["base_eval_loss"] == 3.0
    assert r.data.metrics["train_tokens_per_second"] == 42.5
    assert (r.data.metrics["world_size"], r.data.metrics["allreduce_bytes_per_step"]) == (2, 92480)
    assert r.data.metrics["collective_seconds_per_step"] == 0.004
    assert r.data.metrics["allgather_bytes_per_step"] == 1948928
    assert (r.data.metrics["train_tokens_per_second_rank_0"], r.data.metrics["train_tokens_per_second_rank_1"]) == (
        21.5,
        21.0,
    )
    assert r.data.tags["kubetune.distributed_backend"] == "gloo"
    assert r.data.tags["kubetune.distributed_strategy"] == "fsdp"
    assert r.data.metrics["data.train_rows"] == 2 and r.data.metrics["pack.packing_efficiency"] == 0.9
    assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "train_loss")] == [
        (1, 3.2),
        (2, 2.1),
        (3, 1.7),
    ]
    assert len(r.data.params) == len(cfg.flat())
    assert r.data.params["lora.r"] == "16" and r.data.params["lora.target_modules"] == "all-linear"
    assert r.data.params["eval.prompts"] == "[]" and r.data.params["tracking.uri"] == store
    assert r.data.tags[tracking.TAG_RUN_KEY] == "adapter-a"
    assert r.data.tags[tracking.TAG_DATA_FINGERPRINT] == "data-fp-1"
    assert r.data.tags[tracking.TAG_PROMOTION] == "promoted"
    assert r.data.tags["mlflow.note.content"].startswith("# Evaluation of a")
    files = {
        f.path
        for top in c.list_artifacts(r.info.run_id)
        for f in ([top] if not top.is_dir else c.list_artifacts(r.info.run_id, top.path))
    }
    for expected in (
        "adapter/adapter_model.safetensors",
        "adapter/base_model.json",
        "adapter/merged",
        "eval/metrics.json",
        "eval/eval_report.md",
        "data/data_report.json",
        "pack/pack_report.md",
        "training_summary.json",
        "config.yaml",
    ):
        assert expected in files, expected
    contexts = {(d.dataset.name, d.dataset.digest, t.value) for d in r.inputs.dataset_inputs for t in d.tags}
    assert contexts == {("prepared-train", "data-fp-1", "train"), ("prepared-eval", "data-fp-1", "eval")}

    mv = c.get_model_version("m-first", "1")
    assert mv.source == f"{r.info.artifact_uri}/adapter" and mv.run_id == r.info.run_id
    assert (Path(mv.source) / "adapter_model.safetensors").read_bytes() == b"weights of a"
    assert mv.tags[tracking.TAG_DATA_FINGERPRINT] == "data-fp-1"
    assert float(mv.tags[tracking.TAG_EVAL_LOSS]) == 1.25
    assert mv.tags[tracking.TAG_BASE_MODEL] == "org/Tiny-Model"
    assert mv.tags[tracking.TAG_PROMOTION] == "promoted" and mv.tags[tracking.TAG_REASON] == reg["promotion_reason"]
    assert "merged weights" in mv.description
    assert c.get_registered_model("m-first").aliases == {"champion": 1}
    manifest = json.loads((tmp_path / "registered" / "manifest.json").read_text())
    assert manifest["stage"] == "register" and manifest["status"] == "registered"


def test_the_gate_rejects_worse_and_too_small_gains_and_replaces_the_champion(store, tmp_path):
    cfg = cfg_for(store, "m-gate", tmp_path, min_improvement=0.1)
    first = do_register(cfg, make_run(tmp_path, "g1", eval_loss=1.0), tmp_path / "r1")
    assert first["promotion"] == "promoted"

    worse = do_register(cfg, make_run(tmp_path, "g2", eval_loss=1.2), tmp_path / "r2")
    assert worse["promotion"] == "rejected" and worse["champion_version"] == "1"
    assert worse["promotion_reason"] == "eval_loss 1.2000 does not beat champion version 1 (1.0000)"

    small = do_register(cfg, make_run(tmp_path, "g3", eval_loss=0.95), tmp_path / "r3")
    assert small["promotion"] == "rejected" and small["champion_version"] == "1"
    assert "by only 0.0500, less than min_improvement 0.1000" in small["promotion_reason"]

    better = do_register(cfg, make_run(tmp_path, "g4", eval_loss=0.5), tmp_path / "r4")
    assert better["promotion"] == "promoted" and better["version"] == "4" and better["champion_version"] == "4"
    assert "beats champion version 1 (1.0000) by 0.5000" in better["promotion_reason"]

    c = tracking.client(store)
    assert c.get_registered_model("m-gate").aliases == {"champion": 4}
    assert c.get_model_version("m-gate", "1").tags[tracking.TAG_PROMOTION] == "promoted"  # replaced, not rejected
    assert c.get_model_version("m-gate", "4").tags[tracking.TAG_BASELINE] == "1"
    for reg in (worse, small):  # the decision is on the run too
        tags = c.get_run(reg["run_id"]).data.tags
        assert tags[tracking.TAG_PROMOTION] == "rejected" and tags[tracking.TAG_REASON] == reg["promotion_reason"]


def test_an_adapter_worse_than_its_base_is_not_promoted(store, tmp_path):
    reg = do_register(cfg_for(store, "m-base", tmp_path), make_run(tmp_path, "b", eval_loss=3.5), tmp_path / "r")
    assert reg["promotion"] == "rejected" and reg["champion_version"] is None
    assert reg["promotion_reason"] == "eval_loss 3.5000 does not beat the base model (3.0000)"


@pytest.mark.parametrize(
    ("loss", "baseline", "min_imp", "promoted", "words"),
    [
        (1.0, 2.0, 0.0, True, "by 1.0000"),
        (2.0, 2.0, 0.0, False, "does not beat"),  # a tie is not an improvement
        (2.5, 2.0, 0.0, False, "does not beat"),
        (1.9, 2.0, 0.5, False, "by only 0.1000"),
        (1.5, 2.0, 0.5, True, "by 0.5000"),  # exactly min_improvement is enough
        (float("nan"), 2.0, 0.0, False, "not a finite number"),
        (1.0, None, 0.0, False, "no recorded eval loss"),
    ],
)
def test_decide(loss, baseline, min_imp, promoted, words):
    ok, reason = tracking.decide(loss, baseline, min_imp, "champion version 3")
    assert ok is promoted and words in reason


def test_registering_again_never_makes_a_second_run_or_version(store, tmp_path, monkeypatch):
    run = make_run(tmp_path, "idem", eval_loss=1.0)
    cfg = cfg_for(store, "m-idem", tmp_path)
    first = do_register(cfg, run, tmp_path / "out")

    def must_not_send(*a, **k):
        raise AssertionError("an up-to-date registration must not talk to MLflow")

    with monkeypatch.context() as m:
        m.setattr(tracking, "send", must_not_send)
        assert do_register(cfg, run, tmp_path / "out") == first

    again = do_register(cfg, run, tmp_path / "out2")  # same inputs, fresh output folder: MLflow is consulted
    assert again["run_id"] == first["run_id"] and again["version"] == first["version"] == "1"
    assert again["promotion"] == "promoted" and again["champion_version"] == "1"
    assert len(runs_with_key(store, "exp-m-idem", "adapter-idem")) == 1
    c = tracking.client(store)
    assert len(c.search_model_versions("name = 'm-idem'")) == 1
    assert len(c.get_metric_history(first["run_id"], "train_loss")) == 3
    assert len(c.get_metric_history(first["run_id"], "eval_loss")) == 1
    assert len(c.get_run(first["run_id"]).inputs.dataset_inputs) == 2

    with pytest.raises(register.UserError, match="--overwrite"):
        do_register(cfg_for(store, "m-idem", tmp_path, min_improvement=0.5), run, tmp_path / "out")


def test_unreachable_server_keeps_an_outbox_and_the_stage_succeeds(tmp_path, caplog):
    uri = closed_port_uri()
    run = make_run(tmp_path, "down", eval_loss=1.0)
    cfg = cfg_for(uri, "m-down", tmp_path)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        reg = do_register(cfg, run, tmp_path / "out")
    assert time.monotonic() - started < 20
    assert reg["status"] == "pending" and reg["version"] is None and reg["outbox"] == "outbox.json"
    assert f"MLflow at {uri} unreachable" in caplog.text and "kubetune register" in caplog.text
    box = json.loads((tmp_path / "out" / "outbox.json").read_text())
    assert box["tracking_uri"] == uri and box["run"]["key"] == "adapter-down"
    assert box["run"]["params"]["lora.r"] == "16"
    assert box["run"]["metrics"]["eval_loss"] == 1.0 and box["run"]["metrics"]["train_tokens_per_second"] == 42.5
    assert box["run"]["tags"][tracking.TAG_DATA_FINGERPRINT] == "data-fp-1"
    assert box["run"]["history"]["train_loss"] == [[1, 3.2], [2, 2.1], [3, 1.7]]
    assert box["model"]["tags"][tracking.TAG_EVAL_LOSS] == "1.0"
    for a in box["run"]["artifacts"]:  # snapshots inside the output, by relative path
        assert not Path(a["path"]).is_absolute() and (tmp_path / "out" / a["path"]).exists()
    assert (
        tmp_path / "out" / "outbox" / "00-down-adapter" / "adapter_model.safetensors"
    ).read_bytes() == b"weights of down"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["status"] == "pending"

    again = do_register(cfg, run, tmp_path / "out")  # still down: still pending, the outbox still there
    assert again["status"] == "pending" and (tmp_path / "out" / "outbox.json").is_file()


def test_a_pending_registration_is_sent_once_when_mlflow_is_back(store, tmp_path, monkeypatch, caplog):
    import requests

    run = make_run(tmp_path, "later", eval_loss=1.0)
    cfg = cfg_for(store, "m-later", tmp_path)
    for attempt in (1, 2):  # an outage: every connection fails; the second try fails differently
        with monkeypatch.context() as m:

            def refused(uri, attempt=attempt):
                raise requests.ConnectionError(f"connection to {uri} refused (try {attempt})")

            m.setattr(tracking, "client", refused)
            with caplog.at_level(logging.WARNING):
                pending = do_register(cfg, run, tmp_path / "out")
        assert pending["status"] == "pending" and f"(try {attempt})" in pending["error"]
        # The snapshot is carried over from one pending folder to the next.
        assert (tmp_path / "out" / "outbox" / "00-later-adapter" / "adapter_model.safetensors").is_file()
    assert "unreachable" in caplog.text

    reg = do_register(cfg, run, tmp_path / "out")  # the store is back
    assert reg["status"] == "registered" and reg["promotion"] == "promoted" and reg["version"] == "1"
    assert not (tmp_path / "out" / "outbox.json").exists() and not (tmp_path / "out" / "outbox").exists()
    assert do_register(cfg, run, tmp_path / "out") == reg  # now up to date
    assert len(runs_with_key(store, "exp-m-later", "adapter-later")) == 1
    c = tracking.client(store)
    assert c.get_run(reg["run_id"]).data.metrics["train_tokens_per_second"] == 42.5
    assert {f.path for f in c.list_artifacts(reg["run_id"], "adapter")} >= {"adapter/adapter_model.safetensors"}


def test_a_run_cut_off_mid_way_is_completed_not_duplicated(store, tmp_path, monkeypatch):
    run = make_run(tmp_path, "cut", eval_loss=1.0)
    cfg = cfg_for(store, "m-cut", tmp_path)
    real = tracking._log_artifacts

    def fail_uploads(*a, **k):
        raise OSError("connection reset during upload")

    with monkeypatch.context() as m:
        m.setattr(tracking, "_log_artifacts", fail_uploads)
        pending = do_register(cfg, run, tmp_path / "out")
    assert pending["status"] == "pending" and pending["run_id"]  # the run was created before the failure
    assert tracking._log_artifacts is real
    reg = do_register(cfg, run, tmp_path / "out")
    assert reg["status"] == "registered" and reg["run_id"] == pending["run_id"]
    assert len(runs_with_key(store, "exp-m-cut", "adapter-cut")) == 1
    assert len(tracking.client(store).get_metric_history(reg["run_id"], "train_loss")) == 3


def _version(c, name: str, loss: float, *, promoted: bool, baseline: str = "base"):
    mv = c.create_model_version(
        name, source="file:///nowhere", tags={tracking.TAG_EVAL_LOSS: repr(loss)}, await_creation_for=0
    )
    if promoted:
        c.set_model_version_tag(name, mv.version, tracking.TAG_PROMOTION, "promoted")
        c.set_model_version_tag(name, mv.version, tracking.TAG_BASELINE, str(baseline))
    time.sleep(0.01)  # distinct creation timestamps
    return c.get_model_version(name, mv.version)


def test_convergence_puts_the_alias_back_on_the_better_of_two_racers(store):
    c = tracking.client(store)
    c.create_registered_model("m-race")
    # Both racers compared themselves with the base model (neither saw the other); the worse one wrote last.
    better = _version(c, "m-race", 1.0, promoted=True)
    worse = _version(c, "m-race", 2.0, promoted=True)
    c.set_registered_model_alias("m-race", "champion", worse.version)
    assert tracking.converge(c, "m-race", worse) == "1"
    assert c.get_registered_model("m-race").aliases == {"champion": 1}
    loser = c.get_model_version("m-race", worse.version)
    assert loser.tags[tracking.TAG_PROMOTION] == "rejected"
    assert "lost a concurrent promotion: version 1 (eval_loss 1.0000)" in loser.tags[tracking.TAG_REASON]
    assert c.get_model_version("m-race", better.version).tags[tracking.TAG_PROMOTION] == "promoted"

    # A racer that saw the worse one as champion too: promote() re-reads and ends on the best.
    third = _version(c, "m-race", 1.5, promoted=False)
    result = tracking.promote(c, "m-race", third, eval_loss=1.5, base_eval_loss=3.0, min_improvement=0.0, run_id=None)
    assert result["promotion"] == "rejected" and result["champion_version"] == "1"
    assert "does not beat champion version 1" in result["promotion_reason"]


def test_a_replaced_champion_keeps_its_promotion_and_history_is_not_pulled_back(store):
    c = tracking.client(store)
    c.create_registered_model("m-hist")
    v1 = _version(c, "m-hist", 1.0, promoted=True)
    v2 = _version(c, "m-hist", 0.5, promoted=True, baseline=v1.version)  # beat v1 fairly
    c.set_registered_model_alias("m-hist", "champion", v2.version)
    assert tracking.converge(c, "m-hist", v2) == str(v2.version)
    assert c.get_model_version("m-hist", v1.version).tags[tracking.TAG_PROMOTION] == "promoted"

    # Someone rolls the alias back to v1 by hand; a later fair promotion must not resurrect v2 from history.
    c.set_registered_model_alias("m-hist", "champion", v1.version)
    v3 = _version(c, "m-hist", 0.8, promoted=False)
    result = tracking.promote(
        c, "m-hist", v3, eval_loss=0.8, base_eval_loss=3.0, min_improvement=0.0, run_id=None, window_s=0.0
    )
    assert result["promotion"] == "promoted" and result["champion_version"] == str(v3.version)


def test_champion_data_fingerprint(store, tmp_path, caplog):
    cfg = cfg_for(store, "m-fp", tmp_path)
    assert register.champion_data_fingerprint(cfg) is None  # no such model yet
    do_register(cfg, make_run(tmp_path, "fp", eval_loss=1.0, data_fp="data-xyz"), tmp_path / "out")
    assert register.champion_data_fingerprint(cfg) == "data-xyz"
    with caplog.at_level(logging.WARNING):
        assert register.champion_data_fingerprint(cfg_for(closed_port_uri(), "m-fp", tmp_path), retry=FAST) is None
    assert "unreachable" in caplog.text
    assert register.champion_data_fingerprint(cfg.replace(**{"tracking.enabled": False})) is None


def test_disabled_tracking_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "send", lambda *a, **k: pytest.fail("tracking is disabled"))
    cfg = cfg_for(closed_port_uri(), "m-off", tmp_path, enabled=False)
    assert do_register(cfg, make_run(tmp_path, "off", eval_loss=1.0), tmp_path / "out")["status"] == "disabled"


def test_the_default_store_is_a_sqlite_file_in_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = from_dict(
        {"model": {"name_or_path": "/models/SmolLM2-135M-Instruct.Q4_1.gguf"}, "output_dir": str(tmp_path / "work")}
    )
    uri = tracking.resolve_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    reg = do_register(cfg, make_run(tmp_path, "dflt", eval_loss=1.0), tmp_path / "work" / "registered")
    assert reg["model_name"] == "kubetune-SmolLM2-135M-Instruct.Q4_1" and reg["promotion"] == "promoted"
    stored = list((tmp_path / "work" / "mlartifacts").rglob("adapter_model.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == b"weights of dflt"
    assert tracking.ui_command(cfg)[1:4] == ["ui", "--backend-store-uri", uri]


def test_uri_precedence_names_and_params(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_uri(from_dict({"output_dir": str(tmp_path)})) == "http://env:5000"
    assert tracking.resolve_uri(from_dict({"tracking": {"uri": "http://cfg:1"}})) == "http://cfg:1"
    name = tracking.registered_model_name
    assert (
        name(from_dict({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}}))
        == "kubetune-SmolLM2-135M-Instruct"
    )
    assert name(from_dict({"model": {"name_or_path": "/data/my model (v2)/"}})) == "kubetune-my-model-v2"
    assert name(from_dict({"tracking": {"registered_model": "custom"}})) == "custom"
    params = tracking.params_from_flat({"a": [1, "x"], "b": None, "c": "y" * 7000, "d": 0.5})
    assert params["a"] == '[1, "x"]' and params["b"] == "None" and params["d"] == "0.5"
    assert len(params["c"]) == tracking.MAX_PARAM_LENGTH and params["c"].endswith("...[truncated]")


def test_retries_back_off_exponentially_and_stop(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    delays: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        raise MlflowException("API request failed with exception Connection refused")

    retry = tracking.Retry(attempts=4, base_delay_s=1.0, max_delay_s=3.0, deadline_s=100.0)
    with pytest.raises(tracking.TrackingUnavailable, match="unreachable \\(4 attempt"):
        tracking.with_retries(flaky, retry, "http://x", sleep=delays.append)
    assert delays == [1.0, 2.0, 3.0] and len(calls) == 4

    calls.clear()

    def refused():
        calls.append(1)
        raise MlflowException("no such thing", error_code=PERMISSION_DENIED)

    with pytest.raises(tracking.TrackingUnavailable):
        tracking.with_retries(refused, retry, "http://x", sleep=delays.append)
    assert len(calls) == 1  # a permanent refusal is not retried

    outcomes = iter([MlflowException("blip"), "ok"])

    def once_flaky():
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item

    assert tracking.with_retries(once_flaky, retry, "http://x", sleep=lambda s: None) == "ok"
    import os

    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ or os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] != "0"


def test_convergence_restores_a_champion_the_winners_chain_runs_through(store):
    """Three racers: v2 (0.9) promoted over the base model, v3 (0.7) over v2, v1 (0.5) over the base model. v2's
    convergence moves the alias to v1 and rejects v2 and v3 (v1's chain is empty then); v1 then re-decides against
    v3, which it had read as champion, and records it as its baseline. The last convergence must leave the versions
    on the winner's chain promoted, as champions replaced later are."""
    c = tracking.client(store)
    c.create_registered_model("m-chain")
    for loss in (0.5, 0.9):  # versions 1 and 2
        _version(c, "m-chain", loss, promoted=True)
    _version(c, "m-chain", 0.7, promoted=True, baseline="2")
    c.set_registered_model_alias("m-chain", "champion", "3")
    assert tracking.converge(c, "m-chain", c.get_model_version("m-chain", "2")) == "1"
    tags = {v: c.get_model_version("m-chain", v).tags for v in ("2", "3")}
    assert all(t[tracking.TAG_PROMOTION] == "rejected" for t in tags.values())  # v1's chain was empty then
    c.set_model_version_tag("m-chain", "1", tracking.TAG_BASELINE, "3")  # v1's re-decision
    assert tracking.converge(c, "m-chain", c.get_model_version("m-chain", "1")) == "1"
    assert c.get_registered_model("m-chain").aliases == {"champion": 1}
    for version, successor, over in (("3", "1", "version 2"), ("2", "3", "the base model")):
        mv = c.get_model_version("m-chain", version)
        assert mv.tags[tracking.TAG_PROMOTION] == "promoted", version
        assert (
            mv.tags[tracking.TAG_REASON] == f"was `champion` (promoted over {over}) until version {successor} beat it"
        )
    # converging again changes nothing
    assert tracking.converge(c, "m-chain", c.get_model_version("m-chain", "2")) == "1"
    assert c.get_model_version("m-chain", "2").tags[tracking.TAG_PROMOTION] == "promoted"


def test_check_data_compares_the_prepared_data_with_the_champions(store, tmp_path):
    from components import runtime

    cfg = cfg_for(store, "m-check", tmp_path)
    run = make_run(tmp_path, "chk", eval_loss=1.0, data_fp="data-chk")
    first = register.check_data(cfg, run["prepared"])
    assert (first.verdict, first.champion, first.current) == ("no-champion", None, "data-chk") and first.train
    do_register(cfg, run, tmp_path / "out")
    same = register.check_data(cfg, run["prepared"])
    assert same.verdict == register.UNCHANGED == runtime.UNCHANGED and not same.train
    assert same.reason == "the prepared data is identical to the champion's: training skipped"
    assert (same.model_name, same.tracking_uri) == ("m-check", store)
    assert register.check_data(cfg, run["prepared"], force=True).verdict == "forced"
    other = make_run(tmp_path / "other", "chk2", eval_loss=1.0, data_fp="data-new")
    changed = register.check_data(cfg, other["prepared"])
    assert (changed.verdict, changed.champion, changed.current) == ("new-data", "data-chk", "data-new")
    with pytest.raises(register.UserError, match="is a `pack` output"):
        register.check_data(cfg, run["packed"])


def test_registration_report_lists_the_keys_that_are_set():
    from kubetune.report import Facts, to_markdown

    rep = register.registration_report({"status": "pending", "version": None, "error": "a | b", "other": 1})
    assert rep.title == "Registration" and rep.blocks == [Facts([("status", "pending"), ("error", "a / b")])]
    assert to_markdown(rep) == "# Registration\n\n| | |\n| --- | --- |\n| status | pending |\n| error | a / b |\n"
