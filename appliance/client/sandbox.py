"""The Python SDK: a Sandbox is one microVM with a persistent Python process, reached over the execution API.

    from appliance.client import Sandbox          # reads APPLIANCE_URL and APPLIANCE_API_KEY
    with Sandbox() as sb:
        sb.run_code("x = 41")
        print(sb.run_code("x + 1").text)          # '42'
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

from .errors import ApplianceError, ConnectionFailed, NotReadyError, error_from_response

URL_ENV, KEY_ENV = "APPLIANCE_URL", "APPLIANCE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
UPLOAD_CHUNK = 1 << 20
# How much longer than the exec's own time limit we wait for its answer (interrupt grace, transport).
_EXEC_SLACK_S = 30.0
_DEFAULT_EXEC_WAIT_S = 600.0


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


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int | None
    error: ExecutionError | None = None


class _Api:
    """HTTP plumbing shared by a sandbox and its helpers: auth header, error mapping, retry while warming up."""

    def __init__(self, url: str | None, api_key: str | None, http: httpx.Client | None, request_timeout: float):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get(KEY_ENV)
        if not key:
            raise ApplianceError(f"no API key: pass api_key= or set {KEY_ENV}", code="unauthorized")
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=self.url, timeout=request_timeout)
        self.headers = {"Authorization": f"Bearer {key}"}

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

    def list(self, path: str = "/") -> list[dict[str, Any]]:
        """Entries of a directory: [{name, type, size, mtime}]."""
        response = self._sandbox._api.request("GET", self._sandbox._path("/files/list"), params={"path": path})
        return response.json()["entries"]


class Commands:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(self, cmd: str, timeout: float | None = None) -> CommandResult:
        """Run a bash command line in the sandbox."""
        execution = self._sandbox.run_code(cmd, timeout=timeout, language="bash")
        return CommandResult(execution.stdout, execution.stderr, execution.exit_code, execution.error)


class Sandbox:
    """A sandbox on an appliance service. Creates one unless `sandbox_id` (or Sandbox.connect) names one.

    `timeout_s` is the sandbox's idle lifetime; `ready_timeout` is how long creation waits while the service
    is still warming up (503 not_ready)."""

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
        request_timeout: float = 60.0,
        ready_timeout: float = 60.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._api = _Api(url, api_key, http_client, request_timeout)
        self._request_timeout = request_timeout
        self.files = Files(self)
        self.commands = Commands(self)
        if sandbox_id is not None:
            self.info: dict[str, Any] = self._api.request("GET", f"/v1/sandboxes/{sandbox_id}").json()
        else:
            body = {k: v for k, v in {"timeout_s": timeout_s, "vcpus": vcpus, "memory_mib": memory_mib,
                                      "metadata": metadata}.items() if v is not None}
            self.info = self._create(body, ready_timeout)
        self.id: str = self.info["id"]
        self._closed = False

    @classmethod
    def connect(cls, sandbox_id: str, **kwargs: Any) -> Sandbox:
        """An existing sandbox (one this key created), e.g. from another process."""
        return cls(sandbox_id=sandbox_id, **kwargs)

    @staticmethod
    def list(url: str | None = None, api_key: str | None = None) -> list[dict[str, Any]]:
        api = _Api(url, api_key, None, 30.0)
        try:
            return api.request("GET", "/v1/sandboxes").json()["sandboxes"]
        finally:
            api.close()

    def _create(self, body: dict[str, Any], ready_timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                return self._api.request("POST", "/v1/sandboxes", json=body).json()
            except NotReadyError as exc:
                wait = exc.retry_after or 1.0
                if time.monotonic() + wait > deadline:
                    self._api.close()
                    raise
                time.sleep(wait)
            except BaseException:
                self._api.close()
                raise

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{self.id}{suffix}"

    def run_code(self, code: str, timeout: float | None = None, stream: bool = False,
                 language: str = "python") -> Any:
        """Run code in the sandbox's persistent interpreter. Returns an Execution, or with stream=True an
        ExecutionStream: iterate it for events as they happen; its .execution is the result afterwards."""
        body: dict[str, Any] = {"code": code, "language": language}
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
