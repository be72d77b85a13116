"""Fixtures for the pipeline tests: the compiled pipeline, a small fake KFP API server and a fake Kubernetes API.

No KFP API server can run here, so :class:`FakeKfp` implements the KFP v2beta1 endpoints that kfp 2.17.3's
``kfp.Client`` calls for upload / submit / schedule (listed in pipelines/client.py), keeps their state in
memory like the real server (pipelines, versions, experiments, runs, recurring runs), records every request,
and can be told to fail a route with a given HTTP status. :class:`FakeKube` does the same for the Kubernetes
endpoints that a multi-node train task calls (pipelines/trainjob.py), with a pluggable stand-in for Kubeflow
Trainer's controller.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
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


# --- a fake Kubernetes API for the TrainJob of a multi-node run ----------------------------------------------------

TRAINJOBS = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs(?:/(?P<name>[^/]+))?")
PODS = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?")


def _selects(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``k=v,k2=v2``), the only kind pipelines/trainjob.py sends."""
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


class FakeKube:
    """An in-memory Kubernetes API on 127.0.0.1 with the endpoints pipelines/trainjob.py calls, and no others:
    TrainJobs (create, get, list by label, delete), pods (get, list by label) and pod logs (read, tail, follow as
    a chunked stream, as the API server sends it). Deleting a TrainJob deletes its pods (the garbage collector's
    work). ``controller(fake, trainjob)``, when set, plays Kubeflow Trainer: it is called in a thread after each
    create (a controller that raises fails its TrainJob with the error). Every request is recorded; :meth:`fail`
    makes the next matching request answer an error."""

    def __init__(self, namespace: str = "kubeflow") -> None:
        self.namespace = namespace
        self.requests: list[Request] = []
        self.trainjobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[str]] = {}
        self.controller = None
        self.threads: list[threading.Thread] = []
        self.closing = threading.Event()
        self._failures: list[tuple[str, re.Pattern, int]] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked log streams

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                status, payload = fake._dispatch(self)
                if callable(payload):  # a log stream
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in payload():
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                text = isinstance(payload, str)
                data = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # --- test controls ----------------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int) -> None:
        self._failures.append((method, re.compile(path_regex), status))

    def calls(self, method: str | None = None, path_regex: str = ".*") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and re.search(path_regex, r.path)]

    def endpoints(self) -> set[str]:
        """The kinds of request made: ``METHOD route`` with names replaced by ``{name}``."""
        out = set()
        for r in self.requests:
            path = re.sub(r"/(trainjobs|pods)/[^/]+", r"/\1/{name}", r.path)
            extra = " follow" if r.query.get("follow", "").lower() == "true" else ""
            out.add(f"{r.method} {re.sub(r'/namespaces/[^/]+/', '/namespaces/{ns}/', path)}{extra}")
        return out

    def add_pod(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        phase: str = "Running",
        service_account: str = "default",
    ) -> dict[str, Any]:
        with self._lock:
            n = next(self._ids)
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "uid": f"00000000-0000-4000-8000-{n:012d}",
                    "labels": dict(labels or {}),
                    "creationTimestamp": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
                },
                "spec": {"serviceAccountName": service_account, "containers": [{"name": "node"}]},
                "status": {"phase": phase},
            }
            self.pods[name] = pod
            self.logs.setdefault(name, [])
            return pod

    def add_nodes(self, job: str, count: int, restart: int = 0) -> list[str]:
        """The pods Trainer's JobSet makes for ``job``: one per node, labelled as the JobSet and Job controllers do."""
        names = []
        for index in range(count):
            name = f"{job}-node-{restart}-{index}-x{index}"
            labels = {
                "jobset.sigs.k8s.io/jobset-name": job,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/restart-attempt": str(restart),
                "batch.kubernetes.io/job-completion-index": str(index),
            }
            self.add_pod(name, labels=labels)
            names.append(name)
        return names

    def log(self, pod: str, *lines: str) -> None:
        with self._lock:
            self.logs[pod].extend(lines)

    def end_pod(self, pod: str, exit_code: int, *, reason: str | None = None, finished_at: str = "") -> None:
        with self._lock:
            status = self.pods[pod]["status"]
            status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
            if finished_at:
                terminated["finishedAt"] = finished_at
            status["containerStatuses"] = [{"name": "node", "state": {"terminated": terminated}}]

    def disrupt(self, pod: str, reason: str = "EvictionByEvictionAPI") -> None:
        with self._lock:
            self.pods[pod]["status"].setdefault("conditions", []).append(
                {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "node drained"}
            )

    def _play(self, controller, job: dict[str, Any]) -> None:
        """Run the test's controller; when it raises, the TrainJob fails with the error as its message, so the client
        under test (which waits as long as a TrainJob runs) ends and the test fails on that error instead of hanging."""
        try:
            controller(self, job)
        except Exception as err:
            name = job["metadata"]["name"]
            with self._lock:
                if name in self.trainjobs:
                    self.condition(name, "Failed", "TestControllerError", f"the test's controller raised {err!r}")
            raise

    def condition(self, job: str, type_: str, reason: str, message: str = "") -> None:
        with self._lock:
            status = self.trainjobs[job].setdefault("status", {})
            status.setdefault("conditions", []).append(
                {"type": type_, "status": "True", "reason": reason, "message": message}
            )

    def store(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Put a TrainJob in as the API server would (uid, creation time), without calling the controller."""
        with self._lock:
            obj = json.loads(json.dumps(obj))
            meta = obj["metadata"]
            meta.setdefault("namespace", self.namespace)
            meta["uid"] = f"11111111-0000-4000-8000-{next(self._ids):012d}"
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.trainjobs[meta["name"]] = obj
            return obj

    # --- the API ----------------------------------------------------------------------------------

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> tuple[int, Any]:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        request = Request(handler.command, parts.path, query, {k.lower(): v for k, v in handler.headers.items()})
        if raw:
            request.body = json.loads(raw)
        with self._lock:
            self.requests.append(request)
            for i, (method, pattern, status) in enumerate(self._failures):
                if method == request.method and pattern.search(request.path):
                    del self._failures[i]
                    return status, _status(status, "InternalError", "injected failure")
            return self._route(request)

    def _route(self, r: Request) -> tuple[int, Any]:
        m = TRAINJOBS.fullmatch(r.path)
        if m:
            return self._trainjobs(r, m["name"])
        m = PODS.fullmatch(r.path)
        if m and r.method == "GET":
            if m["name"] is None:
                items = [
                    p for p in self.pods.values() if _selects(r.query.get("labelSelector"), p["metadata"]["labels"])
                ]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if m["name"] not in self.pods:
                return 404, _status(404, "NotFound", f'pods "{m["name"]}" not found')
            if m["log"]:
                return self._log(m["name"], r.query)
            return 200, self.pods[m["name"]]
        return 404, _status(404, "NotFound", f"no route {r.method} {r.path}")

    def _trainjobs(self, r: Request, name: str | None) -> tuple[int, Any]:
        if r.method == "POST" and name is None:
            body = r.body
            assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob", body
            if body["metadata"]["name"] in self.trainjobs:
                return 409, _status(409, "AlreadyExists", f'trainjobs "{body["metadata"]["name"]}" already exists')
            obj = self.store(body)
            if self.controller is not None:
                t = threading.Thread(target=self._play, args=(self.controller, obj), daemon=True)
                self.threads.append(t)
                t.start()
            return 201, obj
        if r.method == "GET" and name is None:
            items = [
                j for j in self.trainjobs.values() if _selects(r.query.get("labelSelector"), j["metadata"]["labels"])
            ]
            return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": items}
        if name not in self.trainjobs:
            return 404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if r.method == "GET":
            return 200, self.trainjobs[name]
        if r.method == "DELETE":
            del self.trainjobs[name]
            for pod in [
                p for p, v in self.pods.items() if v["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name
            ]:
                del self.pods[pod]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 405, _status(405, "MethodNotAllowed", r.method)

    def _log(self, pod: str, query: dict[str, str]) -> tuple[int, Any]:
        assert query.get("container") == "node", query
        lines = list(self.logs[pod])
        if query.get("follow", "").lower() != "true":
            tail = int(query.get("tailLines") or 0)
            shown = lines[-tail:] if tail else lines
            return 200, "".join(f"{line}\n" for line in shown)

        def stream():
            sent = 0
            while True:
                with self._lock:
                    current = list(self.logs.get(pod, []))
                    gone = pod not in self.pods or self.pods[pod]["status"]["phase"] in ("Succeeded", "Failed")
                if sent < len(current):
                    yield "".join(f"{line}\n" for line in current[sent:]).encode()
                    sent = len(current)
                elif gone or self.closing.is_set():
                    return
                else:
                    time.sleep(0.01)

        return 200, stream


@pytest.fixture
def kube():
    """A running :class:`FakeKube` with the train task's own pod in it (see :data:`OWN_POD`)."""
    server = FakeKube()
    server.add_pod(OWN_POD["KFP_POD_NAME"], service_account="kubetune-pipeline")
    server.pods[OWN_POD["KFP_POD_NAME"]]["metadata"]["uid"] = OWN_POD["KFP_POD_UID"]
    server.thread.start()
    yield server
    server.closing.set()
    server.server.shutdown()
    server.server.server_close()


# The KFP executor pod of the train task: the variables KFP's backend sets on it (fieldRef metadata.name / uid).
OWN_POD = {
    "KFP_POD_NAME": "kubetune-sft-abcde-system-container-impl-123",
    "KFP_POD_UID": "3f5e2a10-9c1d-4b7e-8a2f-5d6c7b8a9e0f",
}
