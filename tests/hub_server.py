"""A small Hugging Face Hub for tests: dataset repos served from local folders over HTTP.

The Hub cannot be reached here, so this answers the few endpoints that huggingface_hub's HfFileSystem
and datasets' repo resolution call (repo info, tree listing, paths info, file download with ranges),
for repos `root/OWNER/NAME/` at one fixed commit, which the revisions in REVISIONS name (others are
answered 404, as the Hub answers an unknown revision). A repo named in `private` answers only requests
with `Authorization: Bearer <token>` (others get 401, as the Hub does). Point HF_ENDPOINT at it.
Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REVISIONS = {"main", "v1.0", "refs/pr/1", COMMIT}
API = re.compile(
    r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<verb>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$"
)
RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class HubServer:
    def __init__(self, root: Path, private: dict[str, str] | None = None):
        self.root = root
        self.private = private or {}  # repo -> token
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def answer(self, head: bool = False) -> None:
                url = urlsplit(self.path)  # matched still quoted: a revision may hold an encoded "/"
                hub.requests.append(f"{self.command} {self.path}")
                match = RESOLVE.match(url.path) or API.match(url.path)
                if not match:
                    return self.send_json({"error": "not found"}, 404)
                repo, path = match["repo"], unquote(match["path"] or "")
                if repo in hub.private and self.headers.get("Authorization") != f"Bearer {hub.private[repo]}":
                    return self.send_json({"error": "Invalid credentials"}, 401)
                if match["rev"] is not None and unquote(match["rev"]) not in REVISIONS:
                    return self.send_json({"error": "Invalid rev id"}, 404, error_code="RevisionNotFound")
                if match.re is RESOLVE:
                    return self.resolve(repo, path, head)
                verb = (match["verb"] or "revision").replace("-", "_")
                return getattr(self, verb)(repo, path, url.query)

            def repo_dir(self, repo: str) -> Path | None:
                directory = hub.root / repo
                return directory if directory.is_dir() else None

            def entry(self, repo_dir: Path, file: Path) -> dict:
                relative = file.relative_to(repo_dir).as_posix()
                if file.is_dir():
                    return {
                        "type": "directory",
                        "path": relative,
                        "oid": hashlib.sha1(relative.encode()).hexdigest(),
                    }
                data = file.read_bytes()
                return {
                    "type": "file",
                    "path": relative,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }

            def revision(self, repo: str, _path: str, _query: str) -> None:
                repo_dir = self.repo_dir(repo)
                if repo_dir is None:
                    return self.send_json({"error": "Repository not found"}, 404, error_code="RepoNotFound")
                siblings = [
                    {"rfilename": f.relative_to(repo_dir).as_posix()}
                    for f in sorted(repo_dir.rglob("*"))
                    if f.is_file()
                ]
                self.send_json(
                    {"id": repo, "sha": COMMIT, "private": False, "siblings": siblings, "cardData": {}}
                )

            def tree(self, repo: str, path: str, query: str) -> None:
                repo_dir = self.repo_dir(repo)
                base = repo_dir / path if repo_dir else None
                if base is None or not base.is_dir():
                    return self.send_json({"error": "not found"}, 404, error_code="EntryNotFound")
                recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
                children = sorted(base.rglob("*") if recursive else base.iterdir())
                self.send_json([self.entry(repo_dir, f) for f in children])

            def paths_info(self, repo: str, _path: str, _query: str) -> None:
                repo_dir = self.repo_dir(repo)
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length).decode()
                form = parse_qs(body) if "=" in body and not body.startswith("{") else {}
                paths = form.get("paths") or json.loads(body or "{}").get("paths", [])
                found = [repo_dir / p for p in paths if repo_dir and (repo_dir / p).exists()]
                self.send_json([self.entry(repo_dir, f) for f in found])

            def resolve(self, repo: str, path: str, head: bool) -> None:
                repo_dir = self.repo_dir(repo)
                file = repo_dir / path if repo_dir else None
                if file is None or not file.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if repo_dir else "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                status, body = 200, data
                if rng := self.headers.get("Range"):
                    start, _, end = rng.removeprefix("bytes=").partition("-")
                    first, last = int(start or 0), min(int(end) if end else len(data) - 1, len(data) - 1)
                    status, body = 206, data[first : last + 1]
                    self.send_response(status)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                else:
                    self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def send_json(self, value, status: int = 200, error_code: str | None = None) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(data)

        return Handler
