"""The sandbox engine: QEMU microVMs with a persistent Python process, driven over the agent protocol.

Public surface (what the CLI and the API use): Engine, EngineConfig, Sandbox, ExecResult, ExecLimits, errors.
"""

from .engine import Engine, EngineConfig
from .errors import (
    AgentTimeout,
    BootFailed,
    EngineError,
    ImageNotFound,
    SandboxBusy,
    SandboxClosed,
    SandboxLost,
)
from .sandbox import ExecLimits, ExecResult, Sandbox

__all__ = [
    "AgentTimeout",
    "BootFailed",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ExecLimits",
    "ExecResult",
    "ImageNotFound",
    "Sandbox",
    "SandboxBusy",
    "SandboxClosed",
    "SandboxLost",
]
