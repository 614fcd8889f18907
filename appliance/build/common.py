"""What every build stage shares: the one-line BuildError, running tools, hashing, recipe files."""

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
        raise BuildError(f"{phase}: {args[0]} not found (is it installed? see the Makefile's packages)") from None
    except subprocess.CalledProcessError as exc:
        raise BuildError(error_line(phase, args, exc.returncode, exc.stderr or exc.stdout or "")) from None
    return result.stdout


def describe(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(str(arg) for arg in argv)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an flock on lock_path: a concurrent build of the same thing waits, then finds it done."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
