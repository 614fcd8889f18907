"""The sandbox engine: QEMU microVMs with a persistent Python process, driven over the agent protocol.

Public surface (what the service and the CLI use; nothing else of the package is imported from outside it):
the Engine façade and its config, the Sandbox handle and its results, the values they pass around, and errors.
"""

from .engine import Engine, EngineConfig, NetworkRequest
from .errors import (
    AgentTimeout,
    BootFailed,
    EngineError,
    ImageNotFound,
    LauncherError,
    NetworkUnavailable,
    SandboxBusy,
    SandboxClosed,
    SandboxLost,
)
from .netpolicy import PolicyError
from .network import NetworkError, NetworkSettings
from .sandbox import ExecLimits, ExecResult, Sandbox
from .snapshot import SnapshotError, SnapshotMismatch, SnapshotTampered
from .template import Template, TemplateError

__all__ = [
    "AgentTimeout",
    "BootFailed",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ExecLimits",
    "ExecResult",
    "ImageNotFound",
    "LauncherError",
    "NetworkError",
    "NetworkRequest",
    "NetworkSettings",
    "NetworkUnavailable",
    "PolicyError",
    "Sandbox",
    "SandboxBusy",
    "SandboxClosed",
    "SandboxLost",
    "SnapshotError",
    "SnapshotMismatch",
    "SnapshotTampered",
    "Template",
    "TemplateError",
]
