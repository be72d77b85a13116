"""upload / submit / schedule against a fake KFP v2beta1 API (tests/pipeline/conftest.py): the requests
kfp.Client
makes (pipeline spec, parameters, cron, max concurrency, no catch-up), idempotence, auth, and error
handling."""

from __future__ import annotations

import socket
import threading

import pytest
import yaml

from pipelines import cli
from pipelines.arguments import load_config, pipeline_arguments
from pipelines.client import file_digest


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def upload(capsys, server, package) -> tuple[int, str, str]:
    return run_cli(capsys, "upload", "--host", server.url, "--file", package)


# ------------------------------------------------------------------------------------------------
# upload


def test_upload_creates_the_pipeline_with_the_compiled_spec(kfp_server, compiled, capsys):
    code, out, err = upload(capsys, kfp_server, compiled)
    assert code == 0, err
    (post,) = kfp_server.calls("POST", r"/pipelines/upload$")
    assert post.query["name"] == "kubetune-sft"
    filename, content = post.files["uploadfile"]
    assert content == compiled.read_bytes()
    assert filename.endswith("sft_pipeline.yaml")
    assert file_digest(compiled) in post.query["description"]
    (pipeline,) = kfp_server.pipelines.values()
    version = kfp_server.versions[pipeline["pipeline_id"]][0]
    assert version["pipeline_spec"]["pipelineInfo"]["name"] == "kubetune-sft"
    assert f"#/pipelines/details/{pipeline['pipeline_id']}/version/{version['pipeline_version_id']}" in out
    assert out.startswith("uploaded pipeline kubetune-sft")
    # the reachability check, then kfp.Client's own calls; nothing else
    assert kfp_server.routes()[:2] == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/healthz"]


def test_upload_is_idempotent_and_adds_a_version_when_the_file_changes(kfp_server, compiled, tmp_path, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    code, out, _ = upload(capsys, kfp_server, compiled)
    assert code == 0
    assert out.startswith("already uploaded")
    assert kfp_server.calls("POST", "upload_version") == []

    changed = tmp_path / "sft_pipeline.yaml"
    changed.write_text(compiled.read_text().replace("kubetune-cpu:1.2.3", "kubetune-cpu:1.2.4"))
    code, out, _ = upload(capsys, kfp_server, changed)
    assert code == 0
    (post,) = kfp_server.calls("POST", "upload_version")
    (pid,) = kfp_server.pipelines
    assert post.query["pipelineid"] == pid
    assert post.query["name"].startswith("kubetune-sft-")
    assert post.query["name"].endswith(f"-{file_digest(changed)[:12]}")
    assert file_digest(changed) in post.query["description"]
    assert post.files["uploadfile"][1] == changed.read_bytes()
    assert out.startswith("added version to pipeline kubetune-sft")
    assert len(kfp_server.versions[pid]) == 2


def test_upload_of_a_missing_file_says_to_compile(kfp_server, tmp_path, capsys):
    code, _out, err = upload(capsys, kfp_server, tmp_path / "nope.yaml")
    assert code == 2
    assert "kubetune pipeline compile" in err and len(err.strip().splitlines()) == 1
    assert kfp_server.requests == []


# ------------------------------------------------------------------------------------------------
# submit


def test_submit_runs_the_latest_version_with_the_config_as_parameters(kfp_server, compiled, config_file, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    code, out, err = run_cli(
        capsys,
        "submit",
        "--host",
        kfp_server.url,
        "--config",
        config_file,
        "--experiment",
        "nightly-kfp",
        "--set",
        "lora.r=4",
        "--accelerator",
        "gpu",
    )
    assert code == 0, err
    (experiment_post,) = kfp_server.calls("POST", "/experiments$")
    assert experiment_post.body["display_name"] == "nightly-kfp"
    (run_post,) = kfp_server.calls("POST", "/runs$")
    body = run_post.body
    (pid,) = kfp_server.pipelines
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pid,
        "pipeline_version_id": kfp_server.versions[pid][-1]["pipeline_version_id"],
    }
    assert "pipeline_spec" not in body
    assert body["service_account"] == "kubetune-pipeline"  # Workload Identity for the artifacts bucket
    raw, cfg = load_config(config_file, ["lora.r=4"])
    expected = pipeline_arguments(raw, cfg, accelerator="gpu")
    del expected["checkpoint_root"]  # not given: the compiled default applies
    assert body["runtime_config"]["parameters"] == expected
    params = body["runtime_config"]["parameters"]
    assert params["lora_r"] == 4 and params["accelerator"] == "gpu" and params["max_steps"] == 50
    assert yaml.safe_load(params["config_yaml"]) == {
        "data": {"max_rows": 2000},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 8},
    }
    run_id = next(iter(kfp_server.runs))
    assert out.strip().endswith(f"{kfp_server.url}/#/runs/details/{run_id}")
    assert body["display_name"].startswith("kubetune-sft SmolLM2-135M-Instruct ")


def test_submit_a_compiled_file_embeds_the_pipeline_spec(kfp_server, compiled, capsys):
    code, _out, err = run_cli(
        capsys, "submit", "--host", kfp_server.url, "--file", compiled, "--run-name", "smoke", "--service-account", ""
    )
    assert code == 0, err
    (run_post,) = kfp_server.calls("POST", "/runs$")
    spec = run_post.body["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "kubetune-sft"
    assert "kubernetes" in spec["platform_spec"]["platforms"]
    assert run_post.body["display_name"] == "smoke"
    assert "service_account" not in run_post.body  # '' leaves it to KFP's default
    assert run_post.body["runtime_config"]["parameters"] == {
        "accelerator": "cpu",
        "force": False,
        "refresh_data": False,
    }
    assert kfp_server.pipelines == {}


def test_submit_refuses_a_local_tracking_store(kfp_server, config_file, capsys):
    code, _, err = run_cli(
        capsys,
        "submit",
        "--host",
        kfp_server.url,
        "--config",
        config_file,
        "--set",
        "tracking.uri=sqlite:///mlflow.db",
    )
    assert code == 2
    assert "tracking.uri" in err and "ConfigMap kubetune-settings" in err
    assert kfp_server.requests == []


def test_submit_without_an_uploaded_pipeline_is_refused(kfp_server, config_file, capsys):
    code, _, err = run_cli(capsys, "submit", "--host", kfp_server.url, "--config", config_file)
    assert code == 2
    assert "no pipeline named 'kubetune-sft'" in err and "upload" in err
    assert kfp_server.calls("POST", "/runs$") == []


# ------------------------------------------------------------------------------------------------
# schedule


def schedule(capsys, server, *extra: str):
    return run_cli(capsys, "schedule", "--host", server.url, *extra)


def test_schedule_creates_a_recurring_run_that_follows_the_latest_version(kfp_server, compiled, config_file, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    code, out, err = schedule(capsys, kfp_server, "--cron", "0 3 * * *", "--config", config_file)
    assert code == 0, err
    (post,) = kfp_server.calls("POST", "/recurringruns$")
    body = post.body
    (pid,) = kfp_server.pipelines
    assert body["display_name"] == "kubetune-sft-recurring"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}  # 6 fields, seconds first
    assert body["max_concurrency"] == "1"
    assert body["no_catchup"] is True
    assert body["service_account"] == "kubetune-pipeline"
    assert body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {"pipeline_id": pid}  # no version: always the latest
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    params = body["runtime_config"]["parameters"]
    assert params["refresh_data"] is True  # scheduled runs re-read the data
    assert params["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and params["lora_r"] == 8
    assert out.startswith("created recurring run kubetune-sft-recurring (cron '0 0 3 * * *')")
    assert "#/recurringrun/details/" in out


def test_schedule_is_idempotent_by_name_and_replaces_on_change(kfp_server, compiled, config_file, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    assert schedule(capsys, kfp_server, "--cron", "0 3 * * *", "--config", config_file)[0] == 0
    (first,) = kfp_server.recurring

    code, out, _ = schedule(capsys, kfp_server, "--cron", "0 0 3 * * *", "--config", config_file)
    assert code == 0 and "up to date" in out
    assert len(kfp_server.calls("POST", "/recurringruns$")) == 1
    assert kfp_server.calls("DELETE") == []

    code, out, _ = schedule(capsys, kfp_server, "--cron", "30 4 * * 1", "--config", config_file)
    assert code == 0 and out.startswith("replaced recurring run")
    (second,) = kfp_server.recurring
    assert second != first
    assert kfp_server.recurring[second]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * 1"
    # created first, then the old one deleted: a refused create never leaves the schedule missing
    posts = [i for i, r in enumerate(kfp_server.requests) if r.method == "POST" and r.path.endswith("recurringruns")]
    (delete,) = [i for i, r in enumerate(kfp_server.requests) if r.method == "DELETE"]
    assert kfp_server.requests[delete].path.endswith(first) and posts[-1] < delete

    code, out, _ = schedule(
        capsys, kfp_server, "--cron", "30 4 * * 1", "--config", config_file, "--set", "train.max_steps=80"
    )
    assert code == 0 and out.startswith("replaced")
    (third,) = kfp_server.recurring
    assert kfp_server.recurring[third]["runtime_config"]["parameters"]["max_steps"] == 80


def test_schedule_pause_resume_delete(kfp_server, compiled, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    assert schedule(capsys, kfp_server, "--cron", "0 3 * * *", "--name", "nightly")[0] == 0
    (rid,) = kfp_server.recurring
    assert kfp_server.recurring[rid]["runtime_config"]["parameters"] == {
        "accelerator": "cpu",
        "force": False,
        "refresh_data": True,
    }

    code, out, _ = schedule(capsys, kfp_server, "--name", "nightly", "--pause")
    assert code == 0 and out.startswith("paused recurring run nightly")
    assert kfp_server.calls("POST", ":disable$")[0].path == f"/apis/v2beta1/recurringruns/{rid}:disable"
    assert kfp_server.recurring[rid]["mode"] == "DISABLE"

    # an update keeps a paused schedule paused
    assert schedule(capsys, kfp_server, "--cron", "0 5 * * *", "--name", "nightly")[0] == 0
    (rid,) = kfp_server.recurring
    assert kfp_server.recurring[rid]["mode"] == "DISABLE"

    code, out, _ = schedule(capsys, kfp_server, "--name", "nightly", "--resume")
    assert code == 0 and kfp_server.recurring[rid]["mode"] == "ENABLE"
    code, out, _ = schedule(capsys, kfp_server, "--name", "nightly", "--delete")
    assert code == 0 and out.startswith("deleted recurring run nightly")
    assert kfp_server.recurring == {}

    code, _, err = schedule(capsys, kfp_server, "--name", "nightly", "--pause")
    assert code == 2 and "no recurring run named 'nightly'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "x.yaml"], "--cron is required"),
        (["--cron", "0 3 * *"], "expected a cron expression"),
        (["--pause", "--cron", "0 3 * * *"], "--pause acts on the existing recurring run"),
    ],
)
def test_schedule_bad_input(kfp_server, compiled, capsys, argv, message):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    before = len(kfp_server.requests)
    code, _, err = schedule(capsys, kfp_server, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert kfp_server.calls("POST", "recurringruns") == []
    assert len(kfp_server.requests) - before <= 6  # refused before anything was changed


# ------------------------------------------------------------------------------------------------
# authentication


def test_bearer_token_from_the_environment_goes_on_every_request(kfp_server, compiled, capsys, monkeypatch):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", "id-token-123")
    assert upload(capsys, kfp_server, compiled)[0] == 0
    assert kfp_server.requests
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer id-token-123"}


def test_service_account_token_file_is_used_in_cluster(kfp_server, compiled, capsys, monkeypatch, tmp_path):
    import pipelines.client

    token = tmp_path / "token"
    token.write_text("sa-token-456\n")
    monkeypatch.setattr(pipelines.client, "TOKEN_FILES", (str(tmp_path / "absent"), str(token)))
    assert upload(capsys, kfp_server, compiled)[0] == 0
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer sa-token-456"}


def test_no_token_sends_no_authorization(kfp_server, compiled, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    assert all("authorization" not in r.headers for r in kfp_server.requests)


# ------------------------------------------------------------------------------------------------
# errors: one line, exit 2 for refusals, 1 for an unreachable or failing server


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unauthorized_is_refused_with_a_token_hint(kfp_server, compiled, capsys):
    kfp_server.fail("GET", "/healthz$", 401, "Unauthenticated: no credentials")
    code, _, err = upload(capsys, kfp_server, compiled)
    line = one_line(err)
    assert code == 2
    assert "HTTP 401" in line and "no credentials" in line and "KUBETUNE_KFP_TOKEN" in line


def test_404_from_an_endpoint_is_a_refusal(kfp_server, compiled, capsys):
    kfp_server.fail("GET", "/pipelines$", 404, "Not Found: namespace is required")
    code, _, err = upload(capsys, kfp_server, compiled)
    line = one_line(err)
    assert code == 2
    assert "look up pipeline 'kubetune-sft' refused: HTTP 404 Not Found: namespace is required" in line
    assert kfp_server.calls("POST") == []


def test_500_is_a_server_failure(kfp_server, compiled, config_file, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    kfp_server.fail("POST", "/runs$", 500, "internal error: database is locked")
    code, _, err = run_cli(capsys, "submit", "--host", kfp_server.url, "--config", config_file)
    line = one_line(err)
    assert code == 1
    assert "create the run failed on the server: HTTP 500 internal error: database is locked" in line
    assert kfp_server.runs == {}


def test_unhealthy_server_fails_fast(kfp_server, compiled, capsys):
    kfp_server.fail("GET", "/healthz$", 503, "upstream connect error")
    code, _, err = upload(capsys, kfp_server, compiled)
    assert code == 1 and "unhealthy: HTTP 503" in one_line(err)
    assert len(kfp_server.requests) == 1  # no retry loop


def test_unreachable_host(compiled, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_cli(capsys, "upload", "--host", f"http://127.0.0.1:{port}", "--file", compiled)
    line = one_line(err)
    assert code == 1
    assert f"http://127.0.0.1:{port}: cannot reach the KFP API (Connection refused)" in line


def test_a_host_that_never_answers_times_out(compiled, capsys):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted = []
    stop = threading.Event()

    def accept():  # accept and say nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{listener.getsockname()[1]}"
        code, _, err = run_cli(capsys, "upload", "--host", host, "--file", compiled, "--timeout", "0.5")
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert code == 1 and "timed out" in one_line(err)


def test_not_a_kfp_api(kfp_server, compiled, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "upload", "--host", "localhost:8080", "--file", compiled)
    assert code == 2 and "expected the KFP API base URL" in one_line(err)


def test_submit_sends_train_nodes(kfp_server, compiled, config_file, capsys):
    assert upload(capsys, kfp_server, compiled)[0] == 0
    code, _, err = run_cli(capsys, "submit", "--host", kfp_server.url, "--config", config_file, "--train-nodes", "4")
    assert code == 0, err
    (run_post,) = kfp_server.calls("POST", "/runs$")
    assert run_post.body["runtime_config"]["parameters"]["train_nodes"] == 4
    code, _, err = run_cli(capsys, "submit", "--host", kfp_server.url, "--train-nodes", "0")
    assert code == 2 and "--train-nodes 0: expected a node count of 1 or more" in err
    assert len(kfp_server.calls("POST", "/runs$")) == 1
