"""Fixtures for the pipeline tests: the compiled pipeline, and a small fake KFP API server.

No KFP API server can run here, so :class:`FakeKfp` implements the KFP v2beta1 endpoints that kfp 2.17.3's
``kfp.Client`` calls for upload / submit / schedule (listed in pipelines/client.py), keeps their state in
memory like the real server (pipelines, versions, experiments, runs, recurring runs), records every request,
and can be told to fail a route with a given HTTP status.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

CPU_IMAGE = "registry.example.com/team/kubetune-cpu:1.2.3"
GPU_IMAGE = "registry.example.com/team/kubetune-gpu:1.2.3"
CREATED = "2026-01-01T00:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # parsed JSON
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # multipart: field -> (filename, bytes)


class FakeKfp:
    """An in-memory KFP v2beta1 API on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self._failures: list[tuple[str, re.Pattern, int, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def _handle(self) -> None:
                status, payload = fake._dispatch(self)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # --- test controls ----------------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, message: str = "injected failure") -> None:
        """Answer the next matching request with ``status`` and a KFP-style error body."""
        self._failures.append((method, re.compile(path_regex), status, message))

    def calls(self, method: str | None = None, path_regex: str = ".*") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and re.search(path_regex, r.path)]

    def routes(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    # --- the API ----------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> tuple[int, Any]:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        request = Request(handler.command, parts.path, query, {k.lower(): v for k, v in handler.headers.items()})
        ctype = handler.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + raw
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                request.files[name] = (part.get_filename(), part.get_payload(decode=True))
        elif raw:
            request.body = json.loads(raw)
        with self._lock:
            self.requests.append(request)
            for i, (method, pattern, status, msg) in enumerate(self._failures):
                if method == request.method and pattern.search(request.path):
                    del self._failures[i]
                    return status, {"error": msg, "code": 3, "message": msg, "details": []}
            return self._route(request)

    def _route(self, r: Request) -> tuple[int, Any]:
        p, m = r.path, r.method
        if m == "GET" and p == "/apis/v2beta1/healthz":
            return 200, {"commit_sha": "test", "tag_name": "2.5.0", "multi_user": False}
        if m == "GET" and p == "/apis/v2beta1/pipelines":
            found = _filtered(self.pipelines.values(), r.query.get("filter"))
            return 200, ({"pipelines": found, "total_size": len(found)} if found else {"total_size": 0})
        if m == "POST" and p == "/apis/v2beta1/pipelines/upload":
            name = r.query["name"]
            if any(x["display_name"] == name for x in self.pipelines.values()):
                return 409, {"error": "already exists", "message": f"pipeline {name} already exists"}
            pid = self._new_id("pipeline")
            pipeline = {
                "pipeline_id": pid,
                "display_name": name,
                "description": r.query.get("description", ""),
                "created_at": CREATED,
            }
            self.pipelines[pid] = pipeline
            self.versions[pid] = [self._version(pid, name, r)]
            return 200, pipeline
        if m == "POST" and p == "/apis/v2beta1/pipelines/upload_version":
            pid = r.query["pipelineid"]
            if pid not in self.pipelines:
                return 404, {"message": f"pipeline {pid} not found"}
            version = self._version(pid, r.query["name"], r)
            self.versions[pid].append(version)
            return 200, version
        match = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", p)
        if m == "GET" and match:
            versions = list(reversed(self.versions.get(match.group(1), [])))  # newest first (created_at desc)
            found = _filtered(versions, r.query.get("filter"))[: int(r.query.get("page_size", 10))]
            return 200, ({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if m == "GET" and p == "/apis/v2beta1/experiments":
            found = _filtered(self.experiments.values(), r.query.get("filter"))
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if m == "POST" and p == "/apis/v2beta1/experiments":
            eid = self._new_id("experiment")
            self.experiments[eid] = {**r.body, "experiment_id": eid, "created_at": CREATED}
            return 200, self.experiments[eid]
        if m == "POST" and p == "/apis/v2beta1/runs":
            rid = self._new_id("run")
            self.runs[rid] = {**r.body, "run_id": rid, "state": "PENDING", "created_at": CREATED}
            return 200, self.runs[rid]
        if m == "GET" and p == "/apis/v2beta1/recurringruns":
            found = [
                x
                for x in self.recurring.values()
                if x.get("experiment_id") == r.query.get("experiment_id", x.get("experiment_id"))
            ]
            found = _filtered(found, r.query.get("filter"))
            # The proto field's JSON name: the one v2beta1 list response not in snake_case.
            return 200, ({"recurringRuns": found, "total_size": len(found)} if found else {})
        if m == "POST" and p == "/apis/v2beta1/recurringruns":
            rid = self._new_id("recurring")
            self.recurring[rid] = {
                **r.body,
                "recurring_run_id": rid,
                "created_at": CREATED,
                "status": "ENABLED" if r.body.get("mode") == "ENABLE" else "DISABLED",
            }
            return 200, self.recurring[rid]
        match = re.fullmatch(r"/apis/v2beta1/recurringruns/([^/:]+)(?::(enable|disable))?", p)
        if match:
            rid, verb = match.groups()
            if rid not in self.recurring:
                return 404, {"message": f"recurring run {rid} not found"}
            if m == "DELETE" and verb is None:
                del self.recurring[rid]
                return 200, {}
            if m == "POST" and verb is not None:
                self.recurring[rid]["mode"] = "ENABLE" if verb == "enable" else "DISABLE"
                return 200, {}
        return 404, {"message": f"no route {m} {p}"}

    def _version(self, pid: str, name: str, r: Request) -> dict[str, Any]:
        _filename, content = r.files["uploadfile"]
        return {
            "pipeline_id": pid,
            "pipeline_version_id": self._new_id("version"),
            "display_name": name,
            "description": r.query.get("description", ""),
            "created_at": CREATED,
            "pipeline_spec": next(yaml.safe_load_all(content.decode())),
            "uploaded_bytes": len(content),
        }


def _filtered(items, filter_json: str | None) -> list[dict[str, Any]]:
    """KFP filters as kfp.Client sends them: predicates on display_name, EQUALS (1 or "EQUALS")."""
    items = list(items)
    if not filter_json:
        return items
    for predicate in json.loads(filter_json).get("predicates", []):
        assert predicate["operation"] in (1, "EQUALS"), predicate
        assert predicate["key"] == "display_name", predicate
        items = [x for x in items if x.get("display_name") == predicate["stringValue"]]
    return items


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    """A running :class:`FakeKfp`; kfp.Client's context file and KFP env vars kept out of the test."""
    from kfp.client import client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
        "KUBETUNE_KFP_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    import pipelines.client

    monkeypatch.setattr(pipelines.client, "TOKEN_FILES", (str(tmp_path / "no-such-token"),))
    server = FakeKfp()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="session")
def images():
    """Test image references (not the defaults, so the test sees they come from the compile call)."""
    from pipelines.images import Images

    return Images(cpu=CPU_IMAGE, gpu=GPU_IMAGE)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, images) -> Path:
    """The pipeline compiled with the test images."""
    from pipelines.sft_pipeline import compile_pipeline

    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "sft_pipeline.yaml", images)


@pytest.fixture(scope="session")
def spec(compiled) -> tuple[dict, dict]:
    """``(pipeline_spec, platform_spec)`` of the compiled pipeline."""
    pipeline_spec, platform_spec = yaml.safe_load_all(compiled.read_text())
    return pipeline_spec, platform_spec


@pytest.fixture
def config_file(tmp_path) -> Path:
    """A config a cluster run could use: hub ids, an HTTP tracking URI, some keys without a parameter."""
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "model:\n  name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "data:\n  path: yahma/alpaca-cleaned\n  eval_size: 100\n  max_rows: 2000\n"
        "lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        "train:\n  max_steps: 50\n  batch_size: 8\n"
        "tracking:\n  uri: http://mlflow.kubetune.svc:5000\n  experiment: nightly\n"
    )
    return path
