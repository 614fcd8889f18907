"""Service errors: each has a stable code and HTTP status; the API's one error serializer renders them as
{"error": {"code": ..., "message": ...}}. Messages tell the user what to do."""

from __future__ import annotations


class ServiceError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ServiceError):
    code, status = "bad_request", 400


class Unauthorized(ServiceError):
    code, status = "unauthorized", 401


class Forbidden(ServiceError):
    """A valid key of the wrong kind: a metrics key on the sandbox routes, a tenant key on /metrics."""

    code, status = "forbidden", 403


class NotFound(ServiceError):
    code, status = "not_found", 404


class Busy(ServiceError):
    code, status = "sandbox_busy", 409


class PathConflict(ServiceError):
    """A file operation that the sandbox's files refuse as they are: the target exists (already_exists), or a
    directory to remove is not empty (not_empty)."""

    status = 409

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Conflict(ServiceError):
    """The request does not fit the current state of what it names (a command's closed stdin)."""

    code, status = "conflict", 409


class TooLarge(ServiceError):
    code, status = "too_large", 413


class Invalid(ServiceError):
    code, status = "invalid", 422


class InvalidField(Invalid):
    """422 naming the request field that is wrong (also returned as error.field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NetworkUnavailable(ServiceError):
    """A network policy this host cannot provide (not root, no /dev/net/tun, address range full)."""

    code, status = "network_unavailable", 422


class SnapshotIncompatible(ServiceError):
    """A frozen sandbox made by another QEMU release, machine type, accelerator or guest image."""

    code, status = "snapshot_incompatible", 422


class SnapshotInvalid(ServiceError):
    """A frozen sandbox whose metadata fails authentication (altered, or from another deployment)."""

    code, status = "snapshot_invalid", 422


class LimitReached(ServiceError):
    code, status = "limit_reached", 429


class SandboxLostError(ServiceError):
    code, status = "sandbox_lost", 410


class NotReady(ServiceError):
    code, status = "not_ready", 503


class NodeUnavailable(ServiceError):
    """The node cannot serve the call now, for a while (its registry is locked by another process)."""
    code, status = "node_unavailable", 503


class InsufficientCapacity(ServiceError):
    """The host's memory cannot take the sandboxes asked for (committed guest memory, or its free reserve)."""

    code, status = "insufficient_capacity", 507


class InsufficientStorage(ServiceError):
    code, status = "insufficient_storage", 507


class SnapshotExists(ServiceError):
    """A named snapshot (or published template) of that name exists already."""

    code, status = "snapshot_exists", 409
