"""`ftjob launch k8s --apply` as a process (kubernetes reads KUBECONFIG as it is imported): no cluster is exit
2, and a (fake) API server gets a server-side dry run of everything, then the objects."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import run_ftjob
from k8s_helpers import example_spec_file


def test_apply_without_a_reachable_cluster_is_exit_2(tmp_path):
    spec = example_spec_file(tmp_path)
    nothing = run_ftjob("launch", "k8s", str(spec), "--apply", env={"KUBECONFIG": str(tmp_path / "none")})
    assert nothing.returncode == 2 and "cannot create the objects in Kubernetes" in nothing.stderr
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    closed = run_ftjob(
        "launch", "k8s", str(spec), "--apply", env={"KUBECONFIG": str(tmp_path / "kubeconfig")}
    )
    assert closed.returncode == 2 and "cannot create the objects in Kubernetes" in closed.stderr
    assert "Traceback" not in closed.stderr


class FakeApiServer:
    """Answers object creation as the Kubernetes API does (201 with the object, 409 when it exists)
    and records every request; the real one cannot run here."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        self.requests: list[tuple[str, str]] = []
        self.created: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body["metadata"]["name"]))
                key = f"{self.path.split('?')[0]}/{body['metadata']['name']}"
                status = 409 if key in fake.created else 201
                if status == 201 and "dryRun=All" not in self.path:
                    fake.created.add(key)
                data = json.dumps(body if status == 201 else {"kind": "Status", "code": 409, "reason": "AlreadyExists", "message": "already exists"}).encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
            "current-context": "x",
        }
        path.write_text(yaml.safe_dump(config))
        return path


def test_apply_dry_runs_everything_on_the_server_then_creates_it(tmp_path):
    api = FakeApiServer()
    env = {"KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig"))}
    spec = example_spec_file(tmp_path)
    applied = run_ftjob("launch", "k8s", str(spec), "--apply", "--nodes", "2", env=env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["created configmap/ftjob-spec", "created jobset/ftjob"]
    paths = [path for path, _ in api.requests]
    assert paths == [  # several nodes: a JobSet, a custom resource
        "/api/v1/namespaces/team/configmaps?dryRun=All",
        "/apis/jobset.x-k8s.io/v1alpha2/namespaces/team/jobsets?dryRun=All",
        "/api/v1/namespaces/team/configmaps",
        "/apis/jobset.x-k8s.io/v1alpha2/namespaces/team/jobsets",
    ]
    api.requests.clear()
    again = run_ftjob("launch", "k8s", str(spec), "--apply", "--namespace", "other", env=env)
    assert again.returncode == 0, again.stderr  # another namespace: nothing there yet
    assert all("/namespaces/other/" in path for path, _ in api.requests)
    refused = run_ftjob(
        "launch", "k8s", str(spec), "--apply", env=env
    )  # the same names again: the dry run refuses
    assert refused.returncode == 2 and "AlreadyExists" in refused.stderr
