"""What every build stage shares: the one-line BuildError, running tools, hashing, recipe files, the one lock
helper and the one way to write an output atomically."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from appliance import host_tools

# The recipes live beside the code in the repository: image-builder/{guest,kernel}/.
REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "image-builder"


class BuildError(Exception):
    """A build step failed; the message is one line naming the phase and the tail of the tool's error."""


def error_line(phase: str, argv: Sequence[str], returncode: int, output: str, limit: int = 400) -> str:
    """One line for a failed command: phase, tool, exit code and the last meaningful lines of its output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    tail = " | ".join(lines[-3:]) if lines else "no error output"
    if len(tail) > limit:
        tail = "…" + tail[-limit:]
    return f"{phase}: {Path(argv[0]).name} exited with {returncode}: {tail}"


def run(
    phase: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a tool, return its stdout; a failure becomes a one-line BuildError with the tail of stderr."""
    args = [str(arg) for arg in argv]
    try:
        result = subprocess.run(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=True,
        )
    except FileNotFoundError:
        raise BuildError(f"{phase}: {args[0]} not found ({install_hint(args[0])})") from None
    except subprocess.CalledProcessError as exc:
        raise BuildError(error_line(phase, args, exc.returncode, exc.stderr or exc.stdout or "")) from None
    return result.stdout


def install_hint(program: str) -> str:
    """How to get a missing tool: its Debian package from the one table (appliance/host_tools.py)."""
    package = host_tools.programs().get(Path(program).name)
    if package is None:
        return "is it installed? appliance/host_tools.py lists the tools the builds run"
    return f"install it: {host_tools.install_command(package)}"


def describe(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(str(arg) for arg in argv)


@contextmanager
def exclusive(lock_path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on lock_path: a concurrent build of the same thing waits, then finds it done.

    With wait=False the lock is only tried: the body runs either way and gets False when another process holds it.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write a file (or fill a directory) at; on success it is fsynced and renamed
    into place, so a reader never sees a partial output; on failure it is removed.

    The name is .<name>.partial-<pid>: leftovers of a build killed mid-way are removed first. An existing directory
    at `path` is moved aside and then removed (a rename cannot replace a non-empty directory).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, f".{path.name}.partial-*")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        _fsync_tree(partial)
        if partial.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.replace(path)
        _fsync(path.parent)
    finally:
        _remove(partial)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """The file, or a directory's regular files and the directory itself (what a rename then makes visible)."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.is_file() and not child.is_symlink():
                _fsync(child)
    _fsync(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(directory: Path, pattern: str) -> None:
    """Remove partial outputs named <pattern>-<pid> whose build process is gone (killed mid-way)."""
    for path in directory.glob(pattern):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: object) -> str:
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def parse_list(text: str) -> list[str]:
    """A recipe list: one entry a line; blank lines and '#' comments are ignored."""
    entries = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append(entry)
    return entries


def read_list(path: Path) -> list[str]:
    return parse_list(path.read_text())


def tree_hash(paths: Iterable[Path]) -> str:
    """Hash of the names and bytes of recipe files (directories recursively, caches skipped)."""
    digest = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(REPO_ROOT)).encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()
