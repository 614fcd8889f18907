"""A real `appliance serve` (gunicorn master, workers, pool keeper, microVMs) for integration tests and benches.

Everything lives under fresh temporary directories; stop() ends what start() began, by PID: the gunicorn master
(which stops its workers and the pool keeper), then its process group, then every QEMU whose command line names
the run dir, and finally removes the directories. It is safe to call stop() after a failed start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.vmtools import kill_qemus_under

KEYS = ("key-alpha-0123456789", "key-beta-0123456789")
METRICS_KEY = "key-metrics-0123456789"  # what Prometheus is given: /metrics and nothing else
_VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def appliance_entry_point() -> Path:
    """The installed `appliance` command of this venv: what an operator runs. A missing one fails here, in one line,
    instead of being worked around (a test must not pass while the command a user types is broken)."""
    entry_point = _VENV_BIN / "appliance"
    if not os.access(entry_point, os.X_OK):
        raise RuntimeError(f"no installed `appliance` command at {entry_point}: run `make setup` (pip install -e .)")
    return entry_point


def _in_own_mount_namespace(argv: list[str], meminfo: Path) -> list[str]:
    """`argv` in a mount namespace of its own where `meminfo` is /proc/meminfo: the service sees the host memory that
    file describes (as a container under lxcfs does), and the test can change it while the service runs."""
    if os.geteuid() != 0:
        raise RuntimeError("a service with its own view of /proc/meminfo needs root (unshare --mount)")
    remount = 'mount --bind "$0" /proc/meminfo && exec "$@"'  # exec: the PID stays the service's own
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", remount, str(meminfo), *argv]


@dataclass
class LiveService:
    workers: int = 2
    pool_size: int = 1
    max_requests: int = 0  # 0: gunicorn never recycles workers
    env_extra: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 300.0
    # A file the service reads as /proc/meminfo (its own mount namespace; the file is bind-mounted, so write it in
    # place, never replace it). None: the host's.
    meminfo: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="appliance-api-test-"))
        # VM memory files and sockets go to tmpfs, as in production
        self.run_dir = Path(tempfile.mkdtemp(prefix="appliance-api-run-", dir="/dev/shm"))
        self.state_dir = self.root / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key, self.other_key = KEYS
        self.metrics_key = METRICS_KEY
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / "serve.log"
        self.startup: dict[str, httpx.Response] = {}  # first answers seen while the service warmed up

    @property
    def env(self) -> dict[str, str]:
        # The developer's image choices (APPLIANCE_CONFIG, APPLIANCE_PATHS__IMAGES_DIR, ...) carry over; what the
        # test owns is set below.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
        env.update({
            "APPLIANCE_API_KEYS": ",".join(KEYS),
            "APPLIANCE_METRICS_KEYS": METRICS_KEY,
            "APPLIANCE_PATHS__STATE_DIR": str(self.state_dir),
            "APPLIANCE_PATHS__RUN_DIR": str(self.run_dir),
            "APPLIANCE_SERVICE__POOL_SIZE": str(self.pool_size),
            "APPLIANCE_GUNICORN_MAX_REQUESTS": str(self.max_requests),
            "APPLIANCE_GUNICORN_MAX_REQUESTS_JITTER": "0",
            "APPLIANCE_GUNICORN_GRACEFUL_TIMEOUT": "10",
            **self.env_extra,
        })
        return env

    def start(self) -> LiveService:
        argv = [str(appliance_entry_point()), "serve", "--port", str(self.port), "--workers", str(self.workers)]
        if self.meminfo is not None:
            argv = _in_own_mount_namespace(argv, self.meminfo)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() can end stragglers by group id
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        headers = self.headers()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"appliance serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                ready = httpx.get(f"{self.url}/v1/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if ready.status_code == 503 and "readyz" not in self.startup:
                self.startup["readyz"] = ready
                self.startup["create"] = httpx.post(f"{self.url}/v1/sandboxes", headers=headers, timeout=30)
                if self.startup["create"].status_code == 201:  # the template won the race: undo
                    httpx.delete(f"{self.url}/v1/sandboxes/{self.startup['create'].json()['id']}", headers=headers)
            if ready.status_code == 200:
                if self.pool_size:
                    self.wait_pool_full(deadline)
                return
            time.sleep(0.5)
        raise TimeoutError(f"the service was not ready in {self.ready_timeout_s:g}s:\n{self.log_tail()}")

    def wait_pool_full(self, deadline: float | None = None) -> None:
        """Until the keeper has `pool_size` clones ready (so a create is a hand-out)."""
        deadline = deadline or time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.pooled() >= self.pool_size:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the pool did not fill:\n{self.log_tail()}")

    def pooled(self) -> int:
        import sqlite3

        try:
            db = sqlite3.connect(self.state_dir / "registry.sqlite3", timeout=5)
            try:
                return db.execute("SELECT COUNT(*) FROM sandboxes WHERE state='pooled'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            return 0

    def cli(self, *argv: str, key: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """`appliance *argv` as an operator on this node runs it: the installed command, the service's environment
        (its keys and state dir) and the spec's port; it finds the service and its key by itself. `key`: run as
        a client with that key instead ($APPLIANCE_API_KEY)."""
        env = {name: value for name, value in self.env.items() if name not in ("APPLIANCE_URL", "APPLIANCE_API_KEY")}
        env["APPLIANCE_SERVICE__PORT"] = str(self.port)
        if key is not None:
            env["APPLIANCE_API_KEY"] = key
        return subprocess.run([str(appliance_entry_point()), *argv], cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def client(self, key: str | None = None, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(key), timeout=kwargs.pop("timeout", 120), **kwargs)

    @property
    def master_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        return [pid for pid in children_of(self.master_pid) if "service.pool" not in cmdline(pid)]

    def keeper_pids(self) -> list[int]:
        return [pid for pid in children_of(self.master_pid) if "service.pool" in cmdline(pid)]

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def restart(self, **changes: object) -> LiveService:
        """Stop the master (workers and keeper go with it; user sandboxes stay) and start again, same dirs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        for name, value in changes.items():
            setattr(self, name, value)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.start()

    def stop(self) -> list[int]:
        """End everything; returns the QEMU PIDs that had to be killed (sandboxes users held, by design)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # workers or keeper that outlived the master
        killed = kill_qemus_under(self.run_dir)
        with contextlib.suppress(OSError):  # the service's log outlives its directories, for a failed test
            shutil.copyfile(self.log_path, Path(tempfile.gettempdir()) / "appliance-api-test-last-serve.log")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        return killed

    def __enter__(self) -> LiveService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
