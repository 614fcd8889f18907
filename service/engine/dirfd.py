"""File operations of a root process in directories that others can write (a VM dir is writable by the VM group;
a client's run directory by the client): every one relative to a directory descriptor, never following a link,
never taking over a name someone else made first. Ownership and modes are set on descriptors, never by path.

A failure is an OSError (EEXIST for a name that was already there, ELOOP for a link): the caller refuses the
request; nothing is retried and nothing outside the directories we opened is ever touched.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    """A directory's descriptor; its last component must not be a link."""
    return os.open(path, DIR_FLAGS, dir_fd=dir_fd)


def make_dir(parent_fd: int, name: str, uid: int, gid: int, mode: int) -> int:
    """Create `name` below `parent_fd` (it must not exist) and return its descriptor, owned and moded through
    that descriptor. Whoever can write the parent cannot make us chown or chmod anything else: a link in its place
    is not followed, and a directory that is not the one we made (not ours) is refused."""
    os.mkdir(name, 0o700, dir_fd=parent_fd)
    fd = open_dir(name, parent_fd)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise OSError(f"{name} was replaced while it was being made")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dir_fd: int, name: str, mode: int = 0o644) -> int:
    """A new file's descriptor (write-only); EEXIST if the name is taken (by anyone, a link included)."""
    return os.open(name, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)


def write_new(dir_fd: int, name: str, data: str, mode: int = 0o644) -> None:
    fd = create_file(dir_fd, name, mode)
    with os.fdopen(fd, "w") as out:
        out.write(data)


def replace_file(dir_fd: int, name: str, data: str, mode: int = 0o644) -> None:
    """write_new after removing what is there (unlinkat removes a link itself, never its target). Only in a
    directory no one else can write: elsewhere, someone could make the name again in between (then EEXIST)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    write_new(dir_fd, name, data, mode)


def unlink_below(directory: Path, *names: str) -> None:
    """Remove directory/names[0]/.../names[-1], following no link on the way (the last one itself is removed)."""
    fd = _walk(directory, names[:-1])
    try:
        os.unlink(names[-1], dir_fd=fd)
    finally:
        os.close(fd)


def _walk(directory: Path, names: tuple[str, ...]) -> int:
    """A descriptor of directory/names..., each component opened from its parent's descriptor, no link followed."""
    fd = open_dir(directory)
    try:
        for name in names:
            next_fd = open_dir(name, fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(parent_fd: int, name: str, mode: int) -> int:
    """A subdirectory of ours: made if missing; refused if it is a link or someone else's."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    fd = open_dir(name, parent_fd)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"{name} belongs to uid {info.st_uid}, not to us")
    return fd


def open_beneath(root: Path, path: Path, flags: int, mode: int = 0o600) -> int:
    """Open `path`, which must name something below `root` without '..' or '.', walking each component from
    root's descriptor with O_NOFOLLOW: no link anywhere below root is followed, whoever swaps what and when."""
    if not path.is_absolute() or os.path.normpath(path) != str(path):
        raise OSError(f"{path} is not a plain absolute path")
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise OSError(f"{path} is not below {root}") from None
    if not parts:
        raise OSError(f"{path} is {root} itself")
    fd = _walk(root, parts[:-1])
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def safe_mode(info: os.stat_result, last: bool) -> bool:
    """Root's, and no one else can change it: not writable by group or others (a sticky directory is fine above
    the last component: then only the owner of an entry, root here, can rename or remove it)."""
    if info.st_uid != 0:
        return False
    if info.st_mode & 0o022 == 0:
        return True
    return not last and stat.S_ISDIR(info.st_mode) and bool(info.st_mode & stat.S_ISVTX)


def open_root_owned_dir(path: Path) -> int:
    """A directory's descriptor if it and every directory above it are root's alone (see safe_mode)."""
    real = Path(os.path.realpath(path))
    fd = open_dir("/")
    current = Path("/")
    try:
        for index, part in enumerate(real.parts[1:], start=2):
            next_fd = open_dir(part, fd)
            os.close(fd)
            fd = next_fd
            current = current / part
            if not safe_mode(os.fstat(fd), last=index == len(real.parts)):
                raise OSError(f"{current} is not root's alone (owner or mode)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root_owned(path: Path) -> int:
    """A read-only descriptor of the regular file `path` resolves to, if that file and every directory from / to
    it belong to root and no one else can change them; else OSError saying which one is not. Because no one but
    root can change that chain, what was checked is what the descriptor holds (and what gets bound)."""
    real = Path(os.path.realpath(path))
    fd = open_dir("/")
    try:
        current = Path("/")
        for part in real.parts[1:-1]:
            next_fd = open_dir(part, fd)
            os.close(fd)
            fd = next_fd
            current = current / part
            if not safe_mode(os.fstat(fd), last=False):
                raise OSError(f"{current} is not root's alone (owner or mode)")
        file_fd = os.open(real.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    info = os.fstat(file_fd)
    if not stat.S_ISREG(info.st_mode) or not safe_mode(info, last=True):
        os.close(file_fd)
        raise OSError(f"{real} is not a regular file that is root's alone (owner or mode)")
    return file_fd
