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


class AgentProtocolError(EngineError):
    """The guest sent something the protocol forbids (too long, too deep, not a message): that call ends."""


class SandboxLost(EngineError):
    """The VM is gone (crashed, killed, or its agent stopped answering); its state cannot be recovered."""


BUSY_MESSAGE = "the sandbox is already running code; wait for it or interrupt it"


class SandboxBusy(EngineError):
    def __init__(self, message: str = BUSY_MESSAGE) -> None:
        super().__init__(message)


class SandboxClosed(EngineError):
    pass


class LauncherError(EngineError):
    """The VMM launcher refused a request or did not answer."""


class NetworkUnavailable(EngineError):
    """This host cannot give sandboxes a network (the message says why)."""
