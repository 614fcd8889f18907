"""gunicorn settings for the execution API (`appliance serve` runs gunicorn with this file).

Workers are gthread: a long exec or a big file transfer holds a thread, not a process, and the master's
heartbeat never depends on request length. Workers can be recycled (max_requests) without harm: sandboxes are
QEMU processes detached from every API process, reachable by any worker through the registry.

The master also owns the pool keeper (service.pool): started in when_ready, stopped in on_exit. QEMU processes
are in their own sessions, so neither the keeper's nor the master's exit touches the sandboxes users hold.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from service.settings import SPEC_FILE_ENV, load

_spec = load()

bind = f"{_spec.service.host}:{_spec.service.port}"
# Forwarding headers (X-Forwarded-For/-Proto) are believed from the node's own HAProxy on loopback only, never from
# a client that reaches gunicorn some other way (an operator who binds it to 0.0.0.0); set here, not left to
# gunicorn's default or its FORWARDED_ALLOW_IPS environment variable.
forwarded_allow_ips = "127.0.0.1,::1"
workers = _spec.service.workers
worker_class = "gthread"
threads = int(os.environ.get("APPLIANCE_GUNICORN_THREADS", "8"))
# A worker that does not heartbeat for this long is killed; with gthread the heartbeat is independent of requests.
timeout = 60
# On SIGTERM or recycling, in-flight requests (a streamed exec, a download) get this long to finish.
graceful_timeout = int(os.environ.get("APPLIANCE_GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 75  # longer than common load balancers' idle timeouts, so they close first
max_requests = int(os.environ.get("APPLIANCE_GUNICORN_MAX_REQUESTS", "10000"))
max_requests_jitter = int(os.environ.get("APPLIANCE_GUNICORN_MAX_REQUESTS_JITTER", str(max(max_requests // 10, 0))))
limit_request_line = 8190
preload_app = False  # each worker builds its own app and manager (no shared sockets or SQLite handles)
control_socket_disable = True  # one per user by default: two services would fight over it
proc_name = "appliance-api"
accesslog = os.environ.get("APPLIANCE_GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("APPLIANCE_GUNICORN_LOGLEVEL", "info")

_KEEPER_STOP_S = 10.0
_KEEPER_HEALTHY_S = 60.0  # a keeper that ran this long before dying starts the backoff afresh
_KEEPER_BACKOFF_MAX_S = 60
_state: dict[str, object] = {}
_lock = threading.Lock()


def on_starting(server) -> None:
    """A fresh directory for prometheus-client's per-process files, before any worker imports it (one the
    operator set is emptied instead: samples of a previous run's workers would be counted again)."""
    preset = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if preset:
        os.makedirs(preset, exist_ok=True)
        for name in os.listdir(preset):
            if name.endswith(".db"):
                os.unlink(os.path.join(preset, name))
        return
    directory = tempfile.mkdtemp(prefix="appliance-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _state["metrics_dir"] = directory


def when_ready(server) -> None:
    _state["keeper"] = _start_keeper(server)
    stopping = threading.Event()
    _state["stopping"] = stopping
    threading.Thread(target=_supervise_keeper, args=(server, stopping), name="keeper-supervisor", daemon=True).start()


def _start_keeper(server) -> subprocess.Popen:
    argv = [sys.executable, "-m", "service.pool"]
    if os.environ.get(SPEC_FILE_ENV):
        argv += ["--spec", os.environ[SPEC_FILE_ENV]]
    keeper = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    server.log.info("pool keeper started (pid %s)", keeper.pid)
    return keeper


def _supervise_keeper(server, stopping: threading.Event) -> None:
    """A keeper that dies (a template that failed to boot, a crash) is restarted, with a growing pause."""
    failures, started = 0, time.monotonic()
    while not stopping.wait(1.0):
        with _lock:
            keeper = _state["keeper"]
            if keeper.poll() is None or stopping.is_set():  # type: ignore[union-attr]
                continue
        failures = 0 if time.monotonic() - started > _KEEPER_HEALTHY_S else failures + 1
        delay = min(_KEEPER_BACKOFF_MAX_S, 2 ** failures)
        server.log.error("pool keeper exited; restarting it in %ss", delay)
        if stopping.wait(delay):
            return
        with _lock:
            if not stopping.is_set():
                _state["keeper"] = _start_keeper(server)
                started = time.monotonic()


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    stopping = _state.get("stopping")
    if isinstance(stopping, threading.Event):
        stopping.set()
    with _lock:
        keeper = _state.get("keeper")
    if isinstance(keeper, subprocess.Popen):
        _stop_keeper(server, keeper)
    directory = _state.get("metrics_dir")
    if isinstance(directory, str):
        shutil.rmtree(directory, ignore_errors=True)


def _stop_keeper(server, keeper: subprocess.Popen) -> None:
    # poll() is also how we learn the master already reaped it (gunicorn waits for any child): then it is gone.
    if keeper.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        keeper.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _KEEPER_STOP_S
    while keeper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if keeper.poll() is None:
        server.log.warning("pool keeper %s did not stop in %gs; killing it", keeper.pid, _KEEPER_STOP_S)
        with contextlib.suppress(ProcessLookupError):
            keeper.kill()
        keeper.wait()
    server.log.info("pool keeper stopped")
