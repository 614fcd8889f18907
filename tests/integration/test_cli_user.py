"""What a new user types, run as they run it: the installed `appliance` entry point in a subprocess.

Nothing here goes through CliRunner or `python -m`: a command missing from the group, a broken entry point or an exit
code lost between the command and the shell fails these tests. The commands follow README's first block: init,
doctor, run -c, run script.py, shell (through a real pseudo-terminal, so Ctrl-C is a real SIGINT), bundle --verify.
Sandbox commands boot one microVM each (four boots in all); init, doctor and bundle boot none.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from appliance import bundle
from appliance.progress import Progress
from tests.provisioning.testbundle import stand_in_image

pytestmark = pytest.mark.integration

APPLIANCE = Path(sys.executable).parent / "appliance"
# Deadlines that only catch hangs: a TCG boot takes seconds, a hung one never ends.
COMMAND_TIMEOUT_S = 180.0
PROMPT_TIMEOUT_S = 120.0
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def entry_point() -> Path:
    if not os.access(APPLIANCE, os.X_OK):
        pytest.fail(f"{APPLIANCE} is not installed: `pip install -e .` (make setup) installs the entry point")
    return APPLIANCE


def _base_env(**settings: str) -> dict[str, str]:
    """This process's environment without any APPLIANCE_* setting of the developer's, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", **settings})
    return env


def appliance(entry_point: Path, *args: str, cwd: Path, env: Mapping[str, str],
              stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(entry_point), *args], cwd=cwd, env=dict(env), input=stdin, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """A CLI error: non-zero exit, exactly one line on stderr, no traceback. Returns that line."""
    assert result.returncode != 0, f"exit 0 where an error was due:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 1, f"the error is not one line:\n{result.stderr}"
    return lines[0]


# --- init ---------------------------------------------------------------------------------------------------------


def test_init_writes_a_spec_the_commands_load_and_refuses_to_overwrite_it(entry_point, tmp_path):
    images = tmp_path / "no-images"  # doctor then probes no guest: this test boots nothing
    images.mkdir()
    env = _base_env(APPLIANCE_PATHS__IMAGES_DIR=str(images))

    written = appliance(entry_point, "init", cwd=tmp_path, env=env)
    assert written.returncode == 0, written.stderr
    spec_file = tmp_path / "appliance.toml"
    assert spec_file.is_file() and "wrote appliance.toml" in written.stdout

    # The written spec loads: doctor reads ./appliance.toml and gets past it (a spec error would name the file).
    loaded = appliance(entry_point, "doctor", cwd=tmp_path, env=env)
    assert "appliance.toml" not in loaded.stderr, loaded.stderr
    assert "guest image" in loaded.stdout, loaded.stdout
    # ... and it is that file that is read: a bad value in it is an error naming the file and the field.
    text = spec_file.read_text()
    assert re.search(r"(?m)^memory_mib = 1024$", text), "init no longer writes guest.memory_mib at its default"
    spec_file.write_text(re.sub(r"(?m)^memory_mib = 1024$", "memory_mib = 1", text))
    refused = appliance(entry_point, "doctor", cwd=tmp_path, env=env)
    line = assert_one_line_error(refused)
    assert "appliance.toml" in line and "guest.memory_mib" in line

    # init again: the existing file is kept, byte for byte, and the user is told how to overwrite it.
    kept = spec_file.read_text()
    again = appliance(entry_point, "init", cwd=tmp_path, env=env)
    line = assert_one_line_error(again)
    assert "exists" in line and "--force" in line
    assert spec_file.read_text() == kept
    forced = appliance(entry_point, "init", "--force", cwd=tmp_path, env=env)
    assert forced.returncode == 0, forced.stderr
    assert spec_file.read_text() == text


# --- doctor -------------------------------------------------------------------------------------------------------


def _path_without(program: str, into: Path) -> str:
    """A PATH that finds every program this one finds, except `program`: one directory of symlinks."""
    into.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            target = into / entry.name
            if entry.name == program or target.exists() or target.is_symlink():
                continue  # the first directory on PATH wins, as in a shell
            if entry.is_file() and os.access(entry, os.X_OK):
                target.symlink_to(entry)
    assert shutil.which(program, path=str(into)) is None
    return str(into)


def _names(line: str, word: str) -> bool:
    """`word` stands on its own in `line` (qemu-system-x86 is not named by qemu-system-x86_64)."""
    return re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w.-])", line) is not None


def _lines_naming(output: str, word: str) -> list[str]:
    found = [line for line in output.splitlines() if _names(line, word)]
    assert found, f"no line names {word}:\n{output}"
    return found


def test_doctor_names_a_missing_image_and_how_to_build_it(entry_point, tmp_path):
    """No guest image yet (README runs doctor before `build guest`): a warning with the fix, not a failure."""
    images = tmp_path / "images"
    images.mkdir()
    result = appliance(entry_point, "doctor", cwd=tmp_path, env=_base_env(APPLIANCE_PATHS__IMAGES_DIR=str(images)))
    assert result.returncode == 0, f"doctor failed on a set-up host with no image yet:\n{result.stdout}{result.stderr}"
    assert any(str(images) in line and "appliance build guest" in line
               for line in _lines_naming(result.stdout, "guest image")), result.stdout


def test_doctor_fails_on_a_missing_program_and_names_its_package(entry_point, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    env = _base_env(APPLIANCE_PATHS__IMAGES_DIR=str(images),
                    PATH=_path_without("qemu-system-x86_64", tmp_path / "bin"))
    result = appliance(entry_point, "doctor", cwd=tmp_path, env=env)
    assert result.returncode != 0, f"doctor passed without QEMU:\n{result.stdout}"
    assert "Traceback" not in result.stderr
    # One line names both the missing program and the Debian package that has it (not just the program twice).
    assert any(_names(line, "qemu-system-x86") for line in _lines_naming(result.stdout, "qemu-system-x86_64")), \
        f"no line names qemu-system-x86_64 with its package qemu-system-x86:\n{result.stdout}"


# --- run and shell: one fresh microVM each ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox_env(image_dir: Path, run_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The built guest image, and VM files under the session's run root (whose QEMUs are ended at its end)."""
    state = tmp_path_factory.mktemp("cli-state")
    return _base_env(APPLIANCE_PATHS__GUEST_IMAGE=str(image_dir), APPLIANCE_PATHS__RUN_DIR=str(run_root / "cli"),
                     APPLIANCE_PATHS__STATE_DIR=str(state))


def test_run_c_prints_the_output_and_exits_zero(entry_point, sandbox_env, tmp_path):
    result = appliance(entry_point, "run", "-c", "import sys; print(6 * 7, sys.platform)", cwd=tmp_path,
                       env=sandbox_env)
    assert result.returncode == 0, result.stderr
    assert "42 linux" in result.stdout.splitlines()
    assert "[sandbox on " in result.stderr  # which accelerator it ran on is said


def test_run_script_that_raises_exits_non_zero_with_its_traceback(entry_point, sandbox_env, tmp_path):
    script = tmp_path / "script.py"
    script.write_text('print("before " + "the error")\n\n'
                      'def fail():\n    raise ValueError("bad " + "input")\n\n'
                      'fail()\n')
    result = appliance(entry_point, "run", str(script), cwd=tmp_path, env=sandbox_env)
    assert result.returncode != 0, result.stdout
    assert "before the error" in result.stdout  # what it printed before the exception still shows
    assert "Traceback" in result.stderr and "in fail" in result.stderr
    assert "ValueError: bad input" in result.stderr


def test_run_script_that_succeeds_exits_zero(entry_point, sandbox_env, tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("total = sum(range(10))\nprint('total', total)\n")
    result = appliance(entry_point, "run", "--quiet", str(script), cwd=tmp_path, env=sandbox_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["total 45"]


class Terminal:
    """`appliance shell` on a pseudo-terminal it has as its controlling tty: Ctrl-C there is a real SIGINT."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.pid, self.fd = _spawn_on_pty(argv, env, cwd)
        self.seen = ""  # everything read so far; expect() consumes up to each match
        self._buffer = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout_s: float = PROMPT_TIMEOUT_S) -> str:
        """Read until `pattern` (a regex) shows; return the output up to and including it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while not (match := regex.search(self._buffer)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout_s:.0f}s; the terminal shows:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"the shell ended before {pattern!r}; the terminal showed:\n{self.seen}")
            self._buffer += chunk.replace("\r\n", "\n")
            self.seen += chunk.replace("\r\n", "\n")
        consumed, self._buffer = self._buffer[: match.end()], self._buffer[match.end():]
        return consumed

    def wait(self, timeout_s: float = PROMPT_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                while select.select([self.fd], [], [], 0)[0] and os.read(self.fd, 65536):
                    pass  # drain, so the child never blocks writing to the terminal
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError(f"the shell did not exit within {timeout_s:.0f}s:\n{self.seen}")

    def close(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        os.close(self.fd)


def _spawn_on_pty(argv: list[str], env: Mapping[str, str], cwd: Path) -> tuple[int, int]:
    """pty.fork: the child gets its own session with the pty as controlling terminal (what a terminal emulator does)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: nothing but exec (no pytest state may run here)
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, dict(env))
        finally:
            os._exit(127)
    return pid, fd


@contextlib.contextmanager
def terminal(argv: list[str], env: Mapping[str, str], cwd: Path) -> Iterator[Terminal]:
    term = Terminal(argv, env, cwd)
    try:
        yield term
    finally:
        term.close()


PROMPT = r"(?m)^>>> "


def test_shell_keeps_the_namespace_and_ctrl_c_interrupts_a_running_cell(entry_point, sandbox_env, tmp_path):
    # No exec time limit within reach: only Ctrl-C can end the endless cell before the prompt deadline.
    env = {**sandbox_env, "APPLIANCE_ENGINE__EXEC_TIMEOUT_S": "86400"}
    with terminal([str(entry_point), "shell"], env, tmp_path) as term:
        term.expect(PROMPT)
        term.send("x = 41\r")
        term.expect(PROMPT)
        term.send("x + 1\r")
        assert "42" in _lines(term.expect(PROMPT))

        # A cell that never ends on its own; the marker is printed only once it runs (the echo shows the source).
        term.send('print("spin" + "ning", flush=True); exec("while True: pass")\r')
        term.expect(r"(?m)^spinning$")
        term.send("\x03")
        interrupted = term.expect(PROMPT)
        assert "KeyboardInterrupt" in interrupted

        term.send("x + 1\r")
        assert "42" in _lines(term.expect(PROMPT)), "the namespace did not survive the interrupt"
        term.send("\x04")  # Ctrl-D at the prompt leaves, as python's REPL does
        assert term.wait() == 0, term.seen


# --- bundle -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (real manifest, real tar, this tree's playbooks and roles) made offline: the downloads are
    replaced by an empty package list and a stand-in wheel, and the guest image by a stand-in."""
    root = tmp_path_factory.mktemp("bundle")

    def no_debs(packages: list[str], mirror: str, suite: str, cache_dir: Path) -> list[Path]:
        return []

    def one_wheel(project_dir: Path, cache_dir: Path, dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "appliance-0.0.0-py3-none-any.whl"
        wheel.write_bytes(b"a stand-in wheel for the CLI test\n" * 64)
        return [wheel]

    output = root / "appliance-bundle.tar"
    bundle.create_bundle(output, image_dir=stand_in_image(root / "images"), cache_dir=root / "cache", mirror="m",
                         suite="s", progress=Progress(quiet=True), fetch_debs=no_debs, fetch_wheels=one_wheel)
    return output


def _flip_one_byte(source: Path, target: Path, member_prefix: str) -> str:
    shutil.copyfile(source, target)
    with tarfile.open(target) as tar:
        victim = next(m for m in tar.getmembers() if m.name.startswith(member_prefix) and m.size > 0)
    with target.open("r+b") as stream:
        stream.seek(victim.offset_data + victim.size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0x01]))
    return victim.name


def test_bundle_verify_accepts_an_intact_bundle_and_refuses_one_changed_byte(entry_point, small_bundle, tmp_path):
    env = _base_env()
    intact = appliance(entry_point, "bundle", "--verify", str(small_bundle), cwd=tmp_path, env=env)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == str(small_bundle)
    assert "each checked against its sha256" in intact.stderr  # the summary of what was checked

    tampered = tmp_path / "tampered.tar"
    member = _flip_one_byte(small_bundle, tampered, "ansible/roles/")
    refused = appliance(entry_point, "bundle", "--verify", str(tampered), "--quiet", cwd=tmp_path, env=env)
    line = assert_one_line_error(refused)
    assert member in line and "checksum mismatch" in line
    assert refused.stdout == ""


def test_bundle_without_a_guest_image_stops_with_one_line_and_writes_nothing(entry_point, tmp_path):
    output = tmp_path / "out.tar"
    result = appliance(entry_point, "bundle", "-o", str(output), "--image-dir", str(tmp_path / "no-such-image"),
                       "--quiet", cwd=tmp_path, env=_base_env())
    line = assert_one_line_error(result)
    assert "appliance build guest" in line
    assert list(tmp_path.iterdir()) == []
