"""The guest agent: serves the host's requests over virtio-serial and runs user code in a REPL worker."""

__version__ = "0.1.0"
