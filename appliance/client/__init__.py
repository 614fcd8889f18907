"""Python SDK of the appliance execution API (see also appliance.client.tools for LLM tool declarations)."""

from .commands import CommandHandle, CommandResult
from .errors import (
    ApplianceError,
    AuthenticationError,
    BadRequestError,
    ConnectionFailed,
    FileConflictError,
    InsufficientCapacityError,
    InsufficientStorageError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    SandboxBusyError,
    SandboxLostError,
    ServerError,
    SnapshotExistsError,
)
from .sandbox import Execution, ExecutionError, ExecutionStream, Sandbox
from .watch import FileWatch

__all__ = [
    "ApplianceError",
    "AuthenticationError",
    "BadRequestError",
    "CommandHandle",
    "CommandResult",
    "ConnectionFailed",
    "Execution",
    "ExecutionError",
    "ExecutionStream",
    "FileConflictError",
    "FileWatch",
    "InsufficientCapacityError",
    "InsufficientStorageError",
    "InvalidRequestError",
    "NotFoundError",
    "NotReadyError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "Sandbox",
    "SandboxBusyError",
    "SandboxLostError",
    "ServerError",
    "SnapshotExistsError",
]
