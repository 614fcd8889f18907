"""The deployment's secret: 32 random bytes in a file only the service can read (0600). One per deployment
(docs/security.md): it keys the stored hashes of the API keys and authenticates snapshot metadata, so a snapshot
frozen on one node of a fleet verifies on another, and a file an attacker planted or altered does not.

It is never put in a child process's environment or on a command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

SECRET_BYTES = 32


class SecretError(OSError):
    pass


def read_or_create(path: Path, owner: int | None = None) -> bytes:
    """The secret at `path`; made (0600) if it is absent. Made whole beside it and linked into place, so two
    processes starting at once agree on one secret and neither reads a half-written file. Refused if it is not a
    regular file of `owner` (default: this process's user) with no access for anyone else. Root may name another
    owner (the operator's CLI reading the service user's secret); a secret root makes for it is given to it."""
    owner = os.geteuid() if owner is None else owner
    if owner != os.geteuid() and os.geteuid() != 0:
        raise SecretError(f"only root may read the deployment secret {path} of uid {owner}")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                if owner != os.geteuid():
                    os.fchown(handle.fileno(), owner, -1)
                handle.write(secrets.token_bytes(SECRET_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"cannot read the deployment secret {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077:
            raise SecretError(f"the deployment secret {path} must be a file of uid {owner} with mode 0600")
        secret = handle.read(SECRET_BYTES + 1)
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"the deployment secret {path} is not {SECRET_BYTES} bytes (damaged?)")
    return secret
