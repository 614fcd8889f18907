"""Errors the SDK raises: one class per API error code, each carrying the code, HTTP status and message."""

from __future__ import annotations


class ApplianceError(Exception):
    """Any error the API answered with (or a connection failure: code 'connection')."""

    def __init__(self, message: str, code: str = "error", status: int | None = None,
                 retry_after: float | None = None, field: str | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after
        self.field = field


class ConnectionFailed(ApplianceError):
    """The service could not be reached (not running, wrong APPLIANCE_URL, network)."""


class BadRequestError(ApplianceError):
    """400: the request was malformed."""


class AuthenticationError(ApplianceError):
    """401: no API key, or not a valid one (set APPLIANCE_API_KEY)."""


class PermissionDeniedError(ApplianceError):
    """403: a valid key of the wrong kind (a metrics key on the sandbox routes, a tenant key on /metrics)."""


class NotFoundError(ApplianceError):
    """404: no such sandbox for this key (or no such file)."""


class SandboxBusyError(ApplianceError):
    """409: the sandbox is already running code."""


class SnapshotExistsError(SandboxBusyError):
    """409 snapshot_exists: this key has a snapshot of that name already."""


class SandboxLostError(ApplianceError):
    """410: the sandbox's VM stopped; create a new one."""


class PayloadTooLargeError(ApplianceError):
    """413: the body, code or upload exceeds a service limit."""


class InvalidRequestError(ApplianceError):
    """422: a field is invalid; .field names it."""


class RateLimitError(ApplianceError):
    """429: too many sandboxes; .retry_after says when to try again."""


class NotReadyError(ApplianceError):
    """503: the service is still warming up; .retry_after says when to try again."""


class InsufficientStorageError(ApplianceError):
    """507: no room for it: host memory for a fork's copies, or the disk quota for frozen sandboxes."""


class InsufficientCapacityError(InsufficientStorageError):
    """507 insufficient_capacity: the host's memory cannot take the sandboxes asked for; free some, or retry later."""


class FileConflictError(ApplianceError):
    """409 on a file route: the target exists (already_exists) or a directory to remove is not empty
    (not_empty); the message names the path."""


class ServerError(ApplianceError):
    """5xx: the service failed; its log has the details (the message quotes the request id)."""


_BY_CODE: dict[str, type[ApplianceError]] = {
    "bad_request": BadRequestError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "sandbox_busy": SandboxBusyError,
    "snapshot_exists": SnapshotExistsError,
    "sandbox_lost": SandboxLostError,
    "too_large": PayloadTooLargeError,
    "invalid": InvalidRequestError,
    "limit_reached": RateLimitError,
    "not_ready": NotReadyError,
    "insufficient_storage": InsufficientStorageError,
    "insufficient_capacity": InsufficientCapacityError,
    "already_exists": FileConflictError,
    "not_empty": FileConflictError,
}
_BY_STATUS: dict[int, type[ApplianceError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: SandboxBusyError, 410: SandboxLostError, 413: PayloadTooLargeError, 422: InvalidRequestError,
    429: RateLimitError, 503: NotReadyError, 507: InsufficientStorageError,
}


def error_from_response(status: int, body: object, retry_after: str | None) -> ApplianceError:
    """The exception for an error response (the API's {"error": {...}} body, or whatever a proxy sent)."""
    code, message, field = f"http_{status}", f"HTTP {status}", None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code", code))
        message = str(error.get("message", message))
        field = error.get("field")
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:200]
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else ApplianceError)
    try:
        after = float(retry_after) if retry_after else None
    except ValueError:
        after = None
    return cls(message, code=code, status=status, retry_after=after, field=field)
