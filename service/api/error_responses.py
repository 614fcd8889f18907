"""The API's one error path: every failure becomes {"error": {"code": ..., "message": ...}} with an honest status.

ServiceError subclasses carry their own code and status; Falcon's HTTPError (unknown route, wrong method, ...)
is mapped by status; anything else is a 500 whose traceback goes to the log, never to the client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon

from service.errors import InvalidField, NodeUnavailable, ServiceError
from service.registry import is_busy

from .body_streams import discard_unread

log = logging.getLogger("appliance.api")

# Stable codes for the statuses Falcon itself raises (routing, methods, headers).
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "limit_reached",
    500: "internal",
    503: "not_ready",
}


__all__ = ["InvalidField", "error_body", "handle_error", "install"]  # InvalidField lives in service.errors


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _render(resp: falcon.Response, status: int, body: dict[str, Any], retry_after: int | None = None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)
    resp.stream = None
    if retry_after is not None:
        resp.set_header("Retry-After", str(retry_after))


def handle_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
    """Registered for Exception, falcon.HTTPError and ServiceError: the single serializer of failures."""
    discard_unread(req)
    if is_busy(ex):  # the registry is locked by another process: retry later, not a 500
        log.warning("registry busy in %s %s: %s", req.method, req.path, ex)
        ex = NodeUnavailable("the node's sandbox registry is locked by another process; retry shortly", retry_after=5)
    if isinstance(ex, ServiceError):
        extra = {"field": ex.field} if isinstance(ex, InvalidField) else {}
        _render(resp, ex.status, error_body(ex.code, ex.message, **extra), ex.retry_after)
        req.context.error_code = ex.code
        return
    if isinstance(ex, falcon.HTTPError):
        status = ex.status_code
        code = _CODE_BY_STATUS.get(status, f"http_{status}")
        message = ex.description or ex.title or code
        _render(resp, status, error_body(code, message))
        for name, value in (ex.headers or {}).items():
            resp.set_header(name, value)
        req.context.error_code = code
        return
    request_id = getattr(req.context, "request_id", "-")
    log.exception("unexpected error in %s %s (request %s, key %s)", req.method, req.path, request_id,
                  getattr(req.context, "key_id", None) or "-")  # the key's id, never the key
    message = f"internal error; the service log has the details (request {request_id})"
    _render(resp, 500, error_body("internal", message))
    req.context.error_code = "internal"


def install(app: falcon.App) -> None:
    # Falcon picks the most specific handler by class; one function behind all three keeps one format.
    for kind in (Exception, falcon.HTTPError, ServiceError):
        app.add_error_handler(kind, handle_error)
