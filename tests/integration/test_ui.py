"""`kubetune ui`: it says it is starting, prints the URL only once the UI answers, and stops with its server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml
from mlflow_server import free_port

pytestmark = pytest.mark.integration


def _start(tmp_path, port: int) -> subprocess.Popen:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "ui", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ui_prints_its_url_once_it_answers_and_stops_with_sigterm(tmp_path):
    port = free_port()
    proc = _start(tmp_path, port)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"starting the MLflow UI for sqlite:///{tmp_path / 'mlflow.db'}")
        assert f"waiting for it to answer on http://127.0.0.1:{port}" in first
        line = proc.stdout.readline()
        while line and not line.startswith("MLflow UI:"):
            line = proc.stdout.readline()  # mlflow's own lines may come between
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}")
        # Printed only once it answers: the health check succeeds at once.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with socket.socket() as s:  # the UI's server went with it
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        _stop(proc)


def test_ui_that_cannot_start_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(tmp_path, port)
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            _stop(proc)
    assert proc.returncode == 2
    assert "MLflow UI:" not in out
    errors = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert errors == [
        f"kubetune: error: the MLflow UI stopped before it answered on http://127.0.0.1:{port} (exit code 0; its "
        f"messages are above); if port {port} is taken, pass --port"
    ], err[-2000:]
