"""A small local stand-in for the Hugging Face Hub: the network service only, for offline tests.

It speaks the routes that huggingface_hub 2.4 (and datasets / transformers through it) call to create a repo, commit
files (regular files inline, large files through the LFS batch API and a PUT) and read them back:

    POST /api/repos/create                                   create_repo
    POST /api/validate-yaml                                  README.md metadata check before a commit
    POST /api/{type}s/{repo}/preupload/{rev}                 upload mode of each file (regular | lfs)
    POST /{prefix}{repo}.git/info/lfs/objects/batch          LFS upload instructions
    PUT  /lfs/{type}/{repo}/{sha256}                         the LFS object itself (stored per repo)
    POST /api/{type}s/{repo}/commit/{rev}                    the commit (ndjson)
    GET  /api/{type}s/{repo}[/revision/{rev}]                repo_info / model_info / dataset_info
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]             list_repo_tree (recursive or not)
    POST /api/{type}s/{repo}/paths-info/{rev}                get_paths_info
    GET  /api/{type}s/{repo}/refs                            list_repo_refs
    HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}            hf_hub_download (ETag, X-Repo-Commit, Range)

`{prefix}` is "" for models and "datasets/" for datasets; `{rev}` is a branch or any commit sha of the repo.
State lives in memory: repos -> commits -> {path: blob}. Writes need `Authorization: Bearer <token>`; reading a
private repo does too. Every request is recorded (method, path, headers, body) so that a test can scan bodies, and
`fail(route, status)` makes one route answer with an error (a 5xx mid-upload) until `fail(route, None)`.

    with HubServer(token="hf_test") as hub:   # listens on 127.0.0.1, a free port
        os.environ["HF_ENDPOINT"] = hub.url   # for subprocesses; in-process, pass endpoint=hub.url
"""

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".zip")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.parquet filter=lfs diff=lfs merge=lfs -text\n"
ROUTES = ("create", "validate_yaml", "preupload", "lfs_batch", "lfs_put", "commit", "info", "tree", "paths_info",
          "refs", "resolve")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub calls a file's oid: the sha256 of an LFS file, the git blob sha1 of a regular one."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, uploaded but maybe uncommitted

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def history(self, branch: str = "main") -> list[Commit]:
        """Commits reachable from `branch`, newest first."""
        out, commit = [], self.resolve(branch)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


class HubError(Exception):
    """An HTTP error answer, with the Hub's `X-Error-Code` where the client branches on it."""

    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubServer:
    def __init__(self, token: str = "hf_local_test_token", host: str = "127.0.0.1"):
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- test helpers ----------------------------------------------------------------------------------------------
    def fail(self, route: str, status: int | None = 500):
        """Make `route` (one of ROUTES) answer `status` from now on; `None` heals it."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        if status is None:
            self.failures.pop(route, None)
        else:
            self.failures[route] = status

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: blob.content for path, blob in commit.files.items()}

    # ---- the Hub's behaviour ---------------------------------------------------------------------------------------
    def create_repo(self, payload: dict, authorized: bool) -> dict:
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{_prefix(repo_type)}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)  # the client reads "url"
        repo = Repo(repo_type, repo_id, private=payload.get("visibility", "public") != "public")
        self._commit(repo, "main", "initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id}

    def _commit(self, repo: Repo, branch: str, message: str, files: dict[str, Blob]) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(json.dumps([parent, message, time.time_ns(),
                                          sorted((p, b.oid) for p, b in files.items())]).encode())
        commit = Commit(digest.hexdigest(), parent, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def apply_commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        header = lines[0]["value"] if lines and lines[0].get("key") == "header" else {}
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.resolve(revision)
        if header.get("parentCommit") and header["parentCommit"] != head.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(repo.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        return self._commit(repo, revision, header.get("summary", ""), files)

    def tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append(_file_entry(path, commit.files[path]))
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist", "EntryNotFound")
        return [_folder_entry(f) for f in sorted(folders)] + entries


def _prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": path, "size": len(blob.content), "oid": git_blob_sha1(blob.content)}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.oid, "size": len(blob.content), "pointerSize": 134}
    return entry


def _folder_entry(path: str) -> dict:
    return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}


# ---- HTTP -----------------------------------------------------------------------------------------------------------
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}(?P<rest>/.*)?$")
_RESOLVE = re.compile(rf"^/(?P<prefix>datasets/|spaces/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_PUT = re.compile(rf"^/lfs/(?P<type>model|dataset|space)/{_REPO}/(?P<oid>[0-9a-f]{{64}})$")
_LFS_BATCH = re.compile(rf"^/(?P<prefix>datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/batch$")


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- plumbing --
        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None):
            self._send(status, json.dumps(payload).encode(), headers)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.token}"

        def _repo(self, repo_type: str, repo_id: str) -> Repo:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and not self._authorized()):
                raise HubError(404 if self._authorized() else 401, "Repository not found", "RepoNotFound")
            return repo

        def _dispatch(self):
            url = urlsplit(self.path)
            body = self._body() if self.command in ("POST", "PUT") else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            with hub.lock:  # one request at a time: the store needs no finer locking
                hub.requests.append(Request(self.command, self.path, headers, body))
                try:
                    self._route(unquote(url.path), parse_qs(url.query), body)
                except HubError as err:
                    headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
                    self._json(err.status, {"error": err.message, **err.body}, headers)
                except Exception as err:  # a bug here: answer rather than drop the connection
                    self._json(500, {"error": f"hub_server: {type(err).__name__}: {err}"})

        def _fail(self, route: str):
            if route in hub.failures:
                raise HubError(hub.failures[route], f"injected server error on {route}")

        # -- routes --
        def _route(self, path: str, query: dict, body: bytes):
            method = self.command
            if method == "POST" and path == "/api/repos/create":
                self._fail("create")
                return self._json(200, hub.create_repo(json.loads(body), self._authorized()))
            if method == "POST" and path == "/api/validate-yaml":
                self._fail("validate_yaml")
                return self._validate_yaml(json.loads(body)["content"])
            if (match := _LFS_PUT.match(path)) and method == "PUT":
                self._fail("lfs_put")
                if hashlib.sha256(body).hexdigest() != match["oid"]:
                    raise HubError(400, "LFS object does not match its oid")
                # The href is the capability (a presigned storage URL on the Hub): no Authorization header comes.
                hub.repos[(match["type"], match["repo"])].lfs_objects[match["oid"]] = body
                return self._json(200, {})
            if (match := _LFS_BATCH.match(path)) and method == "POST":
                self._fail("lfs_batch")
                repo_type = (match["prefix"] or "models/")[:-2]
                return self._lfs_batch(self._repo(repo_type, match["repo"]), json.loads(body))
            if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
                self._fail("resolve")
                repo_type = (match["prefix"] or "models/")[:-2]
                return self._resolve(self._repo(repo_type, match["repo"]), match["rev"], match["path"])
            if match := _API.match(path):
                repo = self._repo(match["type"][:-1], match["repo"])
                return self._api(repo, match["rest"] or "", query, body)
            raise HubError(404, f"no route for {method} {path}")

        def _api(self, repo: Repo, rest: str, query: dict, body: bytes):
            method = self.command
            if method == "GET" and (rest == "" or rest.startswith("/revision/")):
                self._fail("info")
                commit = self._commit(repo, rest[len("/revision/"):] if rest else "main")
                return self._json(200, _repo_info(repo, commit))
            if method == "GET" and rest == "/refs":
                self._fail("refs")
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                            for b, sha in repo.branches.items()]
                return self._json(200, {"branches": branches, "converts": [], "tags": []})
            if method == "GET" and rest.startswith("/tree/"):
                self._fail("tree")
                revision, _, folder = rest[len("/tree/"):].partition("/")
                recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
                return self._json(200, hub.tree(self._commit(repo, revision), folder, recursive))
            if method == "POST" and rest.startswith("/paths-info/"):
                self._fail("paths_info")
                commit = self._commit(repo, rest[len("/paths-info/"):])
                paths = parse_qs(body.decode()).get("paths", [])
                return self._json(200, _paths_info(commit, paths))
            if not self._authorized():
                raise HubError(401, "Invalid credentials in Authorization header")
            if method == "POST" and rest.startswith("/preupload/"):
                self._fail("preupload")
                commit = self._commit(repo, rest[len("/preupload/"):])
                return self._json(200, {"files": [_upload_mode(f, commit) for f in json.loads(body)["files"]]})
            if method == "POST" and rest.startswith("/commit/"):
                self._fail("commit")
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                commit = hub.apply_commit(repo, rest[len("/commit/"):], lines)
                url = f"{hub.url}/{_prefix(repo.repo_type)}{repo.repo_id}/commit/{commit.sha}"
                return self._json(200, {"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None})
            raise HubError(404, f"no route for {method} /api/.../{repo.repo_id}{rest}")

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def _validate_yaml(self, content: str):
            match = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
            if metadata is not None and not isinstance(metadata, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
            return self._json(200, {"errors": [], "warnings": []})

        def _lfs_batch(self, repo: Repo, payload: dict):
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in repo.lfs_objects:  # otherwise: already present upstream, nothing to upload
                    href = f"{hub.url}/lfs/{repo.repo_type}/{repo.repo_id}/{obj['oid']}"
                    entry["actions"] = {"upload": {"href": href}}
                objects.append(entry)
            self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                       content_type="application/vnd.git-lfs+json")

        def _resolve(self, repo: Repo, revision: str, path: str):
            commit = self._commit(repo, revision)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha1(blob.content)}"',
                       "Accept-Ranges": "bytes"}
            if blob.lfs:
                headers.update({"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.content))})
            content, status = blob.content, 200
            if (ranged := re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))) and content:
                start = int(ranged[1]) if ranged[1] else max(len(content) - int(ranged[2]), 0)
                end = min(int(ranged[2]), len(content) - 1) if ranged[1] and ranged[2] else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start:end + 1], 206
            self._send(status, content, headers, content_type="application/octet-stream")

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    return Handler


def _repo_info(repo: Repo, commit: Commit) -> dict:
    info = {"id": repo.repo_id, "sha": commit.sha, "private": repo.private, "author": repo.repo_id.split("/")[0],
            "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "disabled": False, "gated": False,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
    readme = commit.files.get("README.md")
    match = re.match(r"^---\n(.*?)\n---", readme.content.decode(errors="replace"), flags=re.S) if readme else None
    if match:
        card_data = yaml.safe_load(match.group(1)) or {}
        info["cardData"] = card_data
        info["tags"] = list(card_data.get("tags") or [])
        if repo.repo_type == "model":
            info["pipeline_tag"], info["library_name"] = card_data.get("pipeline_tag"), card_data.get("library_name")
    return info


def _paths_info(commit: Commit, paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        path = path.strip("/")
        if path in commit.files:
            out.append(_file_entry(path, commit.files[path]))
        elif any(p.startswith(path + "/") for p in commit.files):
            out.append(_folder_entry(path))
    return out


def _upload_mode(file: dict, head: Commit) -> dict:
    sample = base64.b64decode(file["sample"])
    lfs = file["path"].endswith(LFS_EXTENSIONS) or file["size"] > LFS_THRESHOLD or b"\0" in sample
    existing = head.files.get(file["path"])
    return {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
            "oid": existing.oid if existing is not None and existing.lfs == lfs else None}


__all__ = ["HubServer", "ROUTES"]
