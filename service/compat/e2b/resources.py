"""The E2B-compatible routes: each translates to the manager's operations (service/manager.py) and back."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import falcon

from service.api.request_models import CreateSandbox, parse, read_json
from service.errors import BadRequest, Invalid, ServiceError, TooLarge, Unauthorized
from service.keys import TENANT, KeyRing
from service.registry import FROZEN
from service.routing import SANDBOX_ID

from .translate import (
    CODE_PORT,
    TEMPLATES,
    access_token,
    created,
    error_body,
    execute_lines,
    sandbox_info,
    token_key_id,
)

log = logging.getLogger("appliance.api")
MAX_TIMEOUT_S = 7 * 86400
DOCS = "see docs/e2b.md for what this appliance serves"


class E2bError(Exception):
    """An error in E2B's shape ({"code": status, "message"}), which the SDKs show to their user."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def handle_e2b_error(req: falcon.Request, resp: falcon.Response, exc: E2bError, params: dict) -> None:
    resp.status = falcon.code_to_http_status(exc.status)
    resp.media = error_body(exc.status, exc.message)
    if exc.retry_after is not None:
        resp.set_header("Retry-After", str(exc.retry_after))


def translated(responder: Callable) -> Callable:
    """The appliance's errors (stable code, status) as E2B errors: same status, the code named in the message."""

    @functools.wraps(responder)
    def wrapper(self, req, resp, *args, **kwargs):
        try:
            return responder(self, req, resp, *args, **kwargs)
        except ServiceError as exc:
            req.context.error_code = exc.code
            raise E2bError(exc.status, f"{exc.message} ({exc.code})", exc.retry_after) from None

    return wrapper


def _object(req: falcon.Request, limit: int, required: bool = True) -> dict[str, Any]:
    if not required and not req.content_length:
        return {}
    body = read_json(req, limit)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _timeout(value: Any, field: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise Invalid(f"{field}: a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return float(value)


def _sandbox_id(value: str) -> str:
    if not SANDBOX_ID.fullmatch(value or ""):
        raise E2bError(404, f"sandbox {value[:80]!r} not found")
    return value


class _Keyed:
    """Control-plane calls: the key in X-API-Key (E2B's header) or as a Bearer token."""

    def __init__(self, manager, keys: KeyRing, secret: bytes, max_body_bytes: int) -> None:
        self._manager, self._keys, self._secret, self._max_body = manager, keys, secret, max_body_bytes

    def owner(self, req: falcon.Request) -> str:
        key = req.get_header("X-API-Key") or ""
        if not key:
            scheme, _, bearer = (req.get_header("Authorization") or "").partition(" ")
            key = bearer.strip() if scheme.lower() == "bearer" else ""
        credential = self._keys.lookup(key.strip()) if key else None
        if credential is None or credential.kind != TENANT:
            raise Unauthorized("send a valid appliance API key as X-API-Key (E2B_API_KEY)")
        req.context.owner = req.context.key_id = credential.key_id
        return credential.key_id

    def reply(self, resp: falcon.Response, record, status: str = falcon.HTTP_200) -> None:
        resp.status = status
        resp.media = created(record, access_token(self._secret, record.id, record.owner))


class Sandboxes(_Keyed):
    """POST: create; GET: list."""

    @translated
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        owner = self.owner(req)
        body = _object(req, self._max_body)
        template = body.get("templateID", "code-interpreter-v1")
        if template not in TEMPLATES:
            raise E2bError(404, f"template {str(template)[:80]!r} not found: this appliance serves "
                                f"{', '.join(sorted(TEMPLATES))}")
        if body.get("envVars"):
            raise E2bError(400, f"envVars at create are not supported by this appliance yet; {DOCS}")
        if body.get("volumeMounts") or body.get("mcp"):
            raise E2bError(400, f"volumeMounts and mcp at create are not supported by this appliance; {DOCS}")
        # The appliance's own create model validates what both share (bounds, metadata size).
        request = parse(CreateSandbox, {
            "timeout_s": _timeout(body["timeout"]) if body.get("timeout") is not None else None,
            "metadata": body.get("metadata") or None,
            "persistent": bool(body.get("autoPause", False)),
            "network": {"egress": "all"} if body.get("allow_internet_access") is True else None,
        })
        record = self._manager.create(owner, timeout_s=request.timeout_s, metadata=request.metadata,
                                      persistent=request.persistent, network_policy=request.network)
        self.reply(resp, record, falcon.HTTP_201)

    @translated
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        owner = self.owner(req)
        wanted = {value for value in (req.get_param("state") or "running,paused").split(",") if value}
        records = [sandbox_info(record) for record in self._manager.list(owner)]
        resp.media = [info for info in records if info["state"] in wanted]


class SandboxItem(_Keyed):
    """GET: info; DELETE: kill."""

    @translated
    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        resp.media = sandbox_info(self._manager.get(self.owner(req), _sandbox_id(sandbox_id)))

    @translated
    def on_delete(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        self._manager.delete(self.owner(req), _sandbox_id(sandbox_id))
        resp.status = falcon.HTTP_204


class SetTimeout(_Keyed):
    @translated
    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        owner = self.owner(req)
        timeout = _timeout(_object(req, self._max_body).get("timeout"))
        self._manager.set_timeout(owner, _sandbox_id(sandbox_id), timeout)
        resp.status = falcon.HTTP_204


class Pause(_Keyed):
    """Pause is the appliance's freeze: memory, processes and files to disk; connect resumes it."""

    @translated
    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        owner = self.owner(req)
        record = self._manager.get(owner, _sandbox_id(sandbox_id))
        if record.state == FROZEN:
            raise E2bError(409, f"sandbox {sandbox_id} is already paused")
        self._manager.freeze(owner, sandbox_id)
        resp.status = falcon.HTTP_204


class Connect(_Keyed):
    """Connect to a sandbox, resuming it if paused (201 then, 200 if it was running); also the older /resume."""

    @translated
    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        owner = self.owner(req)
        body = _object(req, self._max_body, required=False)
        record = self._manager.get(owner, _sandbox_id(sandbox_id))
        resumed = record.state == FROZEN
        if resumed:
            record = self._manager.resume(owner, sandbox_id)
        if body.get("timeout") is not None:
            self._manager.set_timeout(owner, sandbox_id, _timeout(body["timeout"]))
        self.reply(resp, record, falcon.HTTP_201 if resumed else falcon.HTTP_200)


class Execute:
    """The code-interpreter server's POST /execute (port 49999): runs code in the sandbox's REPL and answers one
    JSON object a line as it runs (stdout, stderr, result, error), then end_of_execution."""

    def __init__(self, manager, keys: KeyRing, secret: bytes, max_body_bytes: int, max_code_bytes: int) -> None:
        self._manager, self._keys, self._secret = manager, keys, secret
        self._max_body, self._max_code = max_body_bytes, max_code_bytes

    @translated
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        sandbox_id = _sandbox_id(req.get_header("E2b-Sandbox-Id") or "")
        port = req.get_header("E2b-Sandbox-Port") or ""
        if port != str(CODE_PORT):
            raise E2bError(404, f"port {port[:10]!r} of a sandbox serves no /execute (the code server is {CODE_PORT})")
        owner = token_key_id(self._secret, sandbox_id, req.get_header("X-Access-Token") or "")
        if owner is None or not self._keys.has_id(owner):
            raise E2bError(401, "missing or wrong X-Access-Token for this sandbox (from the create or connect reply)")
        req.context.owner = req.context.key_id = owner
        body = _object(req, self._max_body)
        code = body.get("code")
        if not isinstance(code, str):
            raise Invalid("code: a string of source code")
        if len(code.encode()) > self._max_code:
            raise TooLarge(f"code is longer than the {self._max_code}-byte limit (service.max_code_bytes)")
        language = body.get("language") or "python"
        if language not in ("python", "bash"):
            raise E2bError(400, f"language {str(language)[:40]!r} is not supported: python or bash; {DOCS}")
        if body.get("context_id") not in (None, "", "default"):
            raise E2bError(400, f"code contexts other than the default one are not supported yet; {DOCS}")
        if body.get("env_vars"):
            raise E2bError(400, f"env_vars per execution are not supported by this appliance yet; {DOCS}")
        events = self._manager.exec_events(owner, sandbox_id, code, language, None)
        resp.content_type = "application/x-ndjson"
        resp.stream = self._stream(owner, sandbox_id, events)

    def _stream(self, owner: str, sandbox_id: str, events: Iterator[dict[str, Any]]) -> Iterator[bytes]:
        finished = False
        try:
            for event in events:
                for line in execute_lines(event):
                    yield json.dumps(line, ensure_ascii=False).encode() + b"\n"
            finished = True
        except Exception as exc:  # the status line is gone: report it as the execution's error
            log.exception("E2B execute stream of %s failed", sandbox_id)
            finished = True
            yield json.dumps({"type": "error", "name": "InternalError", "value": f"the service failed: {exc}",
                              "traceback": ""}).encode() + b"\n"
        finally:
            if not finished:  # the client went away: stop the code rather than let it run for nobody
                with contextlib.suppress(Exception):
                    self._manager.interrupt(owner, sandbox_id)
            with contextlib.suppress(Exception):
                events.close()  # type: ignore[attr-defined]
        yield b'{"type": "end_of_execution"}\n'


class Unsupported:
    """Every other E2B route or RPC: an error naming the feature, at once (never a hang or a half-answer)."""

    def __call__(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        feature = req.path.removeprefix("/e2b").strip("/")[:120] or "/"
        message = f"the E2B feature {req.method} {feature} is not supported by this appliance; {DOCS}"
        if "." in feature.split("/")[0]:  # envd's Connect RPCs (process.Process/Start, filesystem.Filesystem/Stat)
            resp.status = falcon.HTTP_501
            resp.content_type = "application/json"
            resp.media = {"code": "unimplemented", "message": message}
            return
        resp.status = falcon.HTTP_501
        resp.media = error_body(501, message)


def install_routes(app: falcon.App, prefix: str, manager, keys: KeyRing, secret: bytes, max_body_bytes: int,
                   max_code_bytes: int) -> None:
    app.add_error_handler(E2bError, handle_e2b_error)
    keyed = (manager, keys, secret, max_body_bytes)
    for version in ("", "/v2"):
        app.add_route(f"{prefix}{version}/sandboxes", Sandboxes(*keyed))
        app.add_route(f"{prefix}{version}/sandboxes/{{sandbox_id}}/connect", Connect(*keyed))
    app.add_route(f"{prefix}/sandboxes/{{sandbox_id}}", SandboxItem(*keyed))
    app.add_route(f"{prefix}/sandboxes/{{sandbox_id}}/timeout", SetTimeout(*keyed))
    app.add_route(f"{prefix}/sandboxes/{{sandbox_id}}/pause", Pause(*keyed))
    app.add_route(f"{prefix}/sandboxes/{{sandbox_id}}/resume", Connect(*keyed))
    app.add_route(f"{prefix}/execute", Execute(manager, keys, secret, max_body_bytes, max_code_bytes))
    app.add_sink(Unsupported(), prefix=f"{prefix}/")
