"""The Python SDK: a Sandbox is one microVM with a persistent Python process, reached over the execution API.

    from appliance.client import Sandbox          # reads APPLIANCE_URL and APPLIANCE_API_KEY
    with Sandbox() as sb:
        sb.run_code("x = 41")
        print(sb.run_code("x + 1").text)          # '42'
        kids = sb.fork(4)                         # 4 more sandboxes, each with x == 41; sb is unchanged

    sb = Sandbox(persistent=True, idle_freeze_s=300)   # frozen to disk after 5 idle minutes, not closed
    sb.freeze(); sb.detach()                           # or freeze it now; Sandbox.connect(sb.id) resumes it
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

from . import tls
from .commands import Commands
from .errors import ApplianceError, ConnectionFailed, NotFoundError, NotReadyError, error_from_response
from .snapshots import Snapshots
from .watch import FileWatch

URL_ENV, KEY_ENV = "APPLIANCE_URL", "APPLIANCE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
UPLOAD_CHUNK = 1 << 20
# How much longer than the exec's own time limit we wait for its answer (interrupt grace, transport).
_EXEC_SLACK_S = 30.0
_DEFAULT_EXEC_WAIT_S = 600.0
# Fork, freeze and resume move a VM's whole memory: seconds per GiB under emulation.
_LIFECYCLE_WAIT_S = 600.0


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str

    def __str__(self) -> str:
        return self.traceback or f"{self.name}: {self.value}"


@dataclass
class Execution:
    """One exec's result. `results` are MIME bundles (display data, then the trailing expression's value)."""

    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None
    error: ExecutionError | None = None
    exit_code: int | None = None
    truncated_bytes: int = 0
    worker_restarted: bool = False
    worker_exit: str | None = None
    duration_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Execution:
        error = data.get("error")
        return cls(
            stdout=data.get("stdout", ""), stderr=data.get("stderr", ""), results=list(data.get("results", [])),
            text=data.get("text"), error=_error(error) if error else None,
            exit_code=data.get("exit_code"), truncated_bytes=data.get("truncated_bytes", 0),
            worker_restarted=data.get("worker_restarted", False), worker_exit=data.get("worker_exit"),
            duration_s=data.get("duration_s", 0.0),
        )

    @property
    def ok(self) -> bool:
        return self.error is None


class ExecutionStream:
    """Events of a streamed exec as they arrive (dicts with a "type": stdout, stderr, result, done).
    After the loop, `.execution` holds the final result."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self.execution: Execution | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in self._lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("type") == "done":
                self.execution = Execution.from_json(event)
            yield event


class _Api:
    """HTTP plumbing shared by a sandbox and its helpers: auth header, error mapping, retry while warming up."""

    def __init__(self, url: str | None, api_key: str | None, http: httpx.Client | None, request_timeout: float):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get(KEY_ENV)
        if not key:
            raise ApplianceError(f"no API key: pass api_key= or set {KEY_ENV}", code="unauthorized")
        self._key = key
        self._request_timeout = request_timeout
        self._owns_http = http is None
        if http is None:
            try:  # https: the site's CA (APPLIANCE_CA_BUNDLE) or the system's, and a pin if set (client/tls.py)
                verify = tls.httpx_verify(self.url)
            except ValueError as exc:
                raise ApplianceError(str(exc), code="tls_settings") from None
            http = httpx.Client(base_url=self.url, timeout=request_timeout, verify=verify)
        self.http = http
        self.headers = {"Authorization": f"Bearer {key}"}

    def sibling(self) -> _Api:
        """A handle for another sandbox on the same service: it shares a client the caller passed in, else opens
        its own (so closing one sandbox never cuts another's connection)."""
        return _Api(self.url, self._key, None if self._owns_http else self.http, self._request_timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        replayable = not isinstance(kwargs.get("content"), Iterator)
        for attempt in (1, 2):
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
                break
            except httpx.RemoteProtocolError as exc:
                # A kept-alive connection the server closed as we reused it (gunicorn recycling a worker):
                # nothing was answered, so it most likely never reached the service: send it once more.
                if attempt == 2 or not replayable or "without sending a response" not in str(exc):
                    raise ConnectionFailed(f"{self.url} closed the connection: {exc}", code="connection") from None
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"cannot reach {self.url}: {exc}", code="connection") from None
        self.raise_for(response)
        return response

    def stream(self, method: str, path: str, **kwargs: Any):
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.http.stream(method, path, headers=headers, **kwargs)

    @staticmethod
    def raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            body: object = response.json()
        except ValueError:
            body = response.text
        raise error_from_response(response.status_code, body, response.headers.get("Retry-After"))

    def close(self) -> None:
        if self._owns_http:
            self.http.close()


class Files:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def write(self, path: str, data: bytes | str | IO[bytes] | Iterable[bytes]) -> dict[str, Any]:
        """Upload, streamed: a file object or iterable is sent in chunks, never read whole. Returns
        {path, size, sha256} as the sandbox received it."""
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes | bytearray | memoryview):
            content: Any = bytes(data)
        elif hasattr(data, "read"):
            size = _remaining_size(data)
            if size is not None:
                headers["Content-Length"] = str(size)
            content = _read_chunks(data)
        else:
            content = iter(data)
        response = self._sandbox._api.request(
            "PUT", self._sandbox._path("/files"), params={"path": path}, content=content, headers=headers,
            timeout=httpx.Timeout(self._sandbox._request_timeout, read=None, write=None),
        )
        return response.json()

    def read(self, path: str) -> bytes:
        return b"".join(self.read_stream(path))

    def read_stream(self, path: str, chunk_size: int = UPLOAD_CHUNK) -> Iterator[bytes]:
        """Download, streamed: chunks as they arrive."""
        api = self._sandbox._api
        try:
            with api.stream("GET", self._sandbox._path("/files"), params={"path": path},
                            timeout=httpx.Timeout(self._sandbox._request_timeout, read=None)) as response:
                api.raise_for(response)
                yield from response.iter_bytes(chunk_size)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {api.url}: {exc}", code="connection") from None

    def list(self, path: str = "/", depth: int = 1) -> list[dict[str, Any]]:
        """Entries of a directory, [{name, path, type, size, mtime}] in name order, fetched page by page (see
        iter). With depth > 1, each subdirectory's entries follow it (name: the path relative to `path`)."""
        return list(self.iter(path, depth=depth))

    def iter(self, path: str = "/", page_size: int | None = None, depth: int = 1) -> Iterator[dict[str, Any]]:
        """Entries of a directory, one page (GET /files/list) at a time: a huge directory never arrives whole."""
        cursor: str | None = None
        while True:
            page = self.list_page(path, cursor, page_size, depth)
            yield from page["entries"]
            cursor = page["cursor"]
            if not page["more"] or cursor is None:
                return

    def list_page(self, path: str = "/", cursor: str | None = None, limit: int | None = None,
                  depth: int = 1) -> dict[str, Any]:
        """One page: {path, entries, more, cursor}; pass `cursor` back for the next one."""
        params: dict[str, Any] = {"path": path}
        if depth != 1:
            params["depth"] = depth
        if cursor is not None:
            params["cursor"] = cursor
        if limit is not None:
            params["limit"] = limit
        response = self._sandbox._api.request("GET", self._sandbox._path("/files/list"), params=params)
        page = response.json()
        page.setdefault("more", False)  # a service from before paging sends the whole directory
        page.setdefault("cursor", None)
        return page

    def stat(self, path: str) -> dict[str, Any]:
        """{name, path, type (file, dir, link, other), size, mtime, mode[, target]}; a link is not followed.
        NotFoundError if nothing is there."""
        return self._sandbox._api.request("GET", self._sandbox._path("/files/stat"), params={"path": path}).json()

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except NotFoundError:
            return False
        return True

    def remove(self, path: str, recursive: bool = False) -> None:
        """A file, a link (not its target) or an empty directory; any directory with recursive=True
        (else FileConflictError, code not_empty)."""
        params = {"path": path, "recursive": "true"} if recursive else {"path": path}
        self._sandbox._api.request("DELETE", self._sandbox._path("/files"), params=params)

    def make_dir(self, path: str, parents: bool = True) -> bool:
        """mkdir -p (or plain mkdir with parents=False). True if made, False if it was there already."""
        response = self._sandbox._api.request("POST", self._sandbox._path("/files/mkdir"),
                                              json={"path": path, "parents": parents})
        return bool(response.json().get("created"))

    def rename(self, path: str, to: str, overwrite: bool = False) -> None:
        """Move a file, link or directory (also across directories). An existing `to` raises FileConflictError
        (code already_exists) unless overwrite."""
        self._sandbox._api.request("POST", self._sandbox._path("/files/rename"),
                                   json={"path": path, "to": to, "overwrite": overwrite})

    def watch(self, path: str, recursive: bool = False, timeout: float = 60.0) -> FileWatch:
        """create/modify/delete events under a directory, as they happen, for at most `timeout` seconds (see
        appliance.client.watch). The watch is in place when this returns."""
        params = {"path": path, "recursive": "true" if recursive else "false", "timeout_s": timeout}
        return FileWatch(self._sandbox._api, self._sandbox._path("/files/watch"), params,
                         self._sandbox._request_timeout)


class Sandbox:
    """A sandbox on an appliance service. Creates one unless `sandbox_id` (or Sandbox.connect) names one.

    `timeout_s` is the sandbox's idle lifetime: it is closed after that long unused. A `persistent` sandbox is
    frozen to disk instead (after `idle_freeze_s`, which is the same setting under its persistent name) and the next
    call resumes it with its whole process state. `ready_timeout` is how long creation waits while the service is
    still warming up (503 not_ready). `network` is what it may reach ("all", a list like ["10.1.2.0/24",
    "db.internal:5432"], or the API's {"egress": ...}); without it the sandbox has no network interface at all.
    `envs` are environment variables of the whole sandbox (every exec and command; kept by fork and freeze).
    Leaving a `with` block deletes the sandbox, persistent or not; `detach()` keeps it."""

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        sandbox_id: str | None = None,
        timeout_s: float | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        metadata: dict[str, Any] | None = None,
        persistent: bool = False,
        idle_freeze_s: float | None = None,
        network: str | list[str] | dict[str, Any] | None = None,
        envs: dict[str, str] | None = None,
        request_timeout: float = 60.0,
        ready_timeout: float = 60.0,
        http_client: httpx.Client | None = None,
        snapshot: str | None = None,
        template: str | None = None,
    ) -> None:
        if idle_freeze_s is not None:
            if not persistent:
                raise ValueError("idle_freeze_s is for persistent sandboxes: pass persistent=True too")
            if timeout_s is not None and timeout_s != idle_freeze_s:
                raise ValueError("give idle_freeze_s or timeout_s, not both: for a persistent sandbox they are one "
                                 "setting")
            timeout_s = idle_freeze_s
        api = _Api(url, api_key, http_client, request_timeout)
        if sandbox_id is not None:
            try:
                info: dict[str, Any] = api.request("GET", f"/v1/sandboxes/{sandbox_id}").json()
            except BaseException:
                api.close()
                raise
        else:
            body = {k: v for k, v in {"timeout_s": timeout_s, "vcpus": vcpus, "memory_mib": memory_mib,
                                      "metadata": metadata, "persistent": persistent or None,
                                      "network": network_policy(network), "snapshot": snapshot,
                                      "template": template, "envs": envs or None}.items()
                    if v is not None}
            info = self._create(api, body, ready_timeout)
        self._setup(api, info, request_timeout)

    def _setup(self, api: _Api, info: dict[str, Any], request_timeout: float) -> None:
        self._api = api
        self._request_timeout = request_timeout
        self.files = Files(self)
        self.commands = Commands(self)
        self.snapshots = Snapshots(self)
        self.info = info
        self.id: str = info["id"]
        self._closed = False

    @property
    def network(self) -> dict[str, Any] | None:
        """The policy and network identity (mac, address) the service reported; None: no network."""
        return self.info.get("network")

    @classmethod
    def _from_info(cls, api: _Api, info: dict[str, Any], request_timeout: float) -> Sandbox:
        """A handle on a sandbox the service just described (e.g. a fork's copy), without asking again."""
        sandbox = cls.__new__(cls)
        sandbox._setup(api, info, request_timeout)
        return sandbox

    @classmethod
    def create(cls, **kwargs: Any) -> Sandbox:
        """A new sandbox (the constructor's arguments). `snapshot=name` starts it from one of this key's named
        snapshots (its whole live state, reseeded, in its size); `template=name` from one an operator published."""
        return cls(**kwargs)

    @classmethod
    def connect(cls, sandbox_id: str, **kwargs: Any) -> Sandbox:
        """An existing sandbox (one this key created), e.g. from another process."""
        return cls(sandbox_id=sandbox_id, **kwargs)

    def connect_other(self, sandbox_id: str) -> Sandbox:
        """Another sandbox of this key on the same service (e.g. a fork's copy named by id), reached with this
        one's URL, key and settings."""
        api = self._api.sibling()
        try:
            info = api.request("GET", f"/v1/sandboxes/{sandbox_id}").json()
        except BaseException:
            api.close()
            raise
        return type(self)._from_info(api, info, self._request_timeout)

    @staticmethod
    def list(url: str | None = None, api_key: str | None = None, state: str | None = None,
             http_client: httpx.Client | None = None) -> list[dict[str, Any]]:
        """This key's sandboxes (dicts as the API describes them), oldest first; `state` filters: running, frozen
        or lost."""
        api = _Api(url, api_key, http_client, 30.0)
        try:
            params = {"state": state} if state is not None else None
            return api.request("GET", "/v1/sandboxes", params=params).json()["sandboxes"]
        finally:
            api.close()

    @staticmethod
    def _create(api: _Api, body: dict[str, Any], ready_timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                return api.request("POST", "/v1/sandboxes", json=body).json()
            except NotReadyError as exc:
                wait = exc.retry_after or 1.0
                if time.monotonic() + wait > deadline:
                    api.close()
                    raise
                time.sleep(wait)
            except BaseException:
                api.close()
                raise

    @property
    def state(self) -> str:
        """running, frozen or lost, as of the last answer about this sandbox (refresh() asks again)."""
        return self.info["state"]

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{self.id}{suffix}"

    def run_code(self, code: str, timeout: float | None = None, stream: bool = False,
                 language: str = "python", envs: dict[str, str] | None = None) -> Any:
        """Run code in the sandbox's persistent interpreter. Returns an Execution, or with stream=True an
        ExecutionStream: iterate it for events as they happen; its .execution is the result afterwards.
        `envs`: environment variables for this exec only, over the sandbox's own."""
        body: dict[str, Any] = {"code": code, "language": language}
        if envs:
            body["envs"] = envs
        if timeout is not None:
            body["timeout_s"] = timeout
        wait = httpx.Timeout(self._request_timeout, read=(timeout or _DEFAULT_EXEC_WAIT_S) + _EXEC_SLACK_S)
        if not stream:
            return Execution.from_json(self._api.request("POST", self._path("/exec"), json=body, timeout=wait).json())
        return ExecutionStream(self._stream_lines(body, wait))

    def _stream_lines(self, body: dict[str, Any], wait: httpx.Timeout) -> Iterator[str]:
        try:
            with self._api.stream("POST", self._path("/exec"), json=body, timeout=wait,
                                  headers={"Accept": "application/x-ndjson"}) as response:
                self._api.raise_for(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self._api.url}: {exc}", code="connection") from None

    def interrupt(self) -> None:
        """KeyboardInterrupt in the code running now (from another thread or process); the namespace is kept."""
        self._api.request("POST", self._path("/interrupt"))

    def refresh(self) -> dict[str, Any]:
        self.info = self._api.request("GET", self._path()).json()
        return self.info

    def _lifecycle(self, action: str, **kwargs: Any) -> httpx.Response:
        wait = httpx.Timeout(self._request_timeout, read=max(self._request_timeout, _LIFECYCLE_WAIT_S))
        return self._api.request("POST", self._path(f"/{action}"), timeout=wait, **kwargs)

    def fork(self, n: int = 1) -> list[Sandbox]:
        """n new sandboxes, each starting from this one's state now: its variables, fitted models, imported
        modules and files. This one keeps running unchanged; the copies are independent of it and of each other
        (and get fresh random seeds). Each copy is a sandbox of its own: close it, or use it in a `with` block.
        Raises RateLimitError (429) or InsufficientStorageError (507) when the copies would not fit."""
        response = self._lifecycle("fork", json={"n": n})
        return [type(self)._from_info(self._api.sibling(), info, self._request_timeout)
                for info in response.json()["sandboxes"]]

    def freeze(self) -> dict[str, Any]:
        """Write the sandbox's whole state to the service's disk and stop its VM (it then uses no memory). The next
        call on it (from this object, or Sandbox.connect(id) in another process, even after the service
        restarted) resumes it. Returns the sandbox's description (state frozen)."""
        self.info = self._lifecycle("freeze").json()
        return self.info

    def resume(self) -> dict[str, Any]:
        """Restore a frozen sandbox now (any call does it anyway; this just pays the wait up front)."""
        self.info = self._lifecycle("resume").json()
        return self.info

    def close(self) -> None:
        """Delete the sandbox (its VM stops) and close the connection. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        try:
            self._api.request("DELETE", self._path())
        except ApplianceError as exc:
            if exc.status != 404:
                raise
        finally:
            self._api.close()

    def detach(self) -> None:
        """Close the connection but keep the sandbox running (Sandbox.connect(id) reaches it again)."""
        self._closed = True
        self._api.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, url={self._api.url!r})"


def _error(data: dict[str, Any]) -> ExecutionError:
    return ExecutionError(str(data.get("name", "")), str(data.get("value", "")), str(data.get("traceback") or ""))


def _remaining_size(handle: IO[bytes]) -> int | None:
    try:
        position = handle.tell()
        end = handle.seek(0, os.SEEK_END)
        handle.seek(position)
    except (OSError, AttributeError, ValueError):
        return None
    return end - position


def _read_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(UPLOAD_CHUNK):
        if isinstance(chunk, str):
            chunk = chunk.encode()
        yield chunk


def network_policy(network: str | list[str] | dict[str, Any] | None) -> dict[str, Any] | None:
    """The API's policy object from the SDK's shorthands: "none" / "all", a list of allowed CIDRs or host:port,
    or the full {"egress": ...} object."""
    if network is None or isinstance(network, dict):
        return network
    if isinstance(network, str):
        return {"egress": network}
    return {"egress": {"allow": list(network)}}
