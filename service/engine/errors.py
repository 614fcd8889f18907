"""Engine errors. Each message is one line a user or operator can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class ImageNotFound(EngineError):
    pass


class BootFailed(EngineError):
    """QEMU exited or the guest never reached the agent. The VM and its files are already cleaned up."""


class AgentTimeout(EngineError):
    pass


class SandboxLost(EngineError):
    """The VM is gone (crashed, killed, or its agent stopped answering); its state cannot be recovered."""


class SandboxBusy(EngineError):
    pass


class SandboxClosed(EngineError):
    pass
