"""Python SDK of the appliance execution API (see also appliance.client.tools for LLM tool declarations)."""

from .commands import CommandHandle, CommandResult
from .errors import (
    ApplianceError,
    AuthenticationError,
    BadRequestError,
    ConnectionFailed,
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
)
from .sandbox import Execution, ExecutionError, ExecutionStream, Sandbox

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
]
