"""What a network policy and the VMM launcher cost, against the same operation without them, in one run.

    .venv/bin/python bench/network_bench.py [--runs 7]

Service level (SandboxManager, no HTTP), jailed VMs, one pool keeper:
  - create from the pool, no network (baseline) vs with {"egress": "none"} and an allow-list: the difference is
    the host namespace, filter and tap plus the guest loading its NIC driver;
  - fork(1) of a networked sandbox vs of a plain one;
  - engine level: boot through the root launcher (an unprivileged client's path) vs booting jailed directly.
Needs root. Ratios matter more than absolute values: the machine is shared, and VMs run under TCG here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tables import ms, p50, print_rows  # bench/, the script's own directory

from appliance.spec import guest_image_dir, load_spec
from service import settings
from service.engine import Engine
from service.engine.launch import RemoteLauncher
from service.engine.launch_checks import LauncherScope
from service.launcherd import LauncherConfig, serve
from service.manager import SandboxManager
from service.pool import PoolKeeper
from service.registry import POOLED
from tests.vmtools import kill_qemus_under

OWNER = "bench"
POLICIES = {"none (baseline)": None, "egress none": {"egress": "none"},
            "allow-list": {"egress": {"allow": ["198.18.0.0/15", "10.20.30.40:5432"]}}}


def p50_ms(samples: list[float]) -> str:
    return ms(p50(samples))


def wait_pool(manager: SandboxManager, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 300
    while manager.readiness() is not None or not manager.registry.count(states=(POOLED,)):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the pool keeper did not fill the pool")
        time.sleep(0.2)


def service_rows(image: Path, root: Path, runs: int) -> list[tuple[str, str, str]]:
    spec = load_spec(overrides={
        "guest": {"memory_mib": 512}, "paths": {"run_dir": root / "svc", "state_dir": root / "state"},
        "service": {"pool_size": 1, "warm_code": "import random", "max_sandboxes_per_key": 8, "max_sandboxes": 10,
                    "workers": 1, "egress_private_allow": ["198.18.0.0/15", "10.20.30.40/32"]},  # POLICIES' ranges
    })
    config = settings.service_config(spec, [], image)
    keeper = PoolKeeper(config)
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    manager = SandboxManager(config)
    rows = []
    try:
        creates: dict[str, list[float]] = {name: [] for name in POLICIES}
        for _ in range(runs):
            for name, policy in POLICIES.items():
                wait_pool(manager, thread)
                started = time.perf_counter()
                record = manager.create(OWNER, network_policy=policy)
                creates[name].append(time.perf_counter() - started)
                manager.delete(OWNER, record.id)
        base = statistics.median(creates["none (baseline)"])
        for name, samples in creates.items():
            rows.append((f"create from pool, network {name}", p50_ms(samples),
                         f"{statistics.median(samples) / base:.2f}× baseline"))
        forks: dict[str, list[float]] = {"plain": [], "networked": []}
        for _ in range(max(2, runs // 2)):
            for name, policy in (("plain", None), ("networked", {"egress": "none"})):
                wait_pool(manager, thread)
                source = manager.create(OWNER, network_policy=policy)
                started = time.perf_counter()
                clones = manager.fork(OWNER, source.id, 1)
                forks[name].append(time.perf_counter() - started)
                for record in [source, *clones]:
                    manager.delete(OWNER, record.id)
        base = statistics.median(forks["plain"])
        for name, samples in forks.items():
            rows.append((f"fork(1), {name} source", p50_ms(samples), f"{statistics.median(samples) / base:.2f}×"))
    finally:
        for record in manager.registry.list(owner=OWNER):
            manager._destroy(record)
        keeper.stop()
        thread.join(60)
        manager.close()
    return rows


def launcher_rows(spec, image: Path, root: Path, runs: int) -> list[tuple[str, str, str]]:
    run = root / "lrun"
    run.mkdir()
    socket_path = root / "launcher.sock"
    server = serve(LauncherConfig(socket_path=socket_path, policy=settings.jail_policy(spec),
                                  network=settings.network_settings(spec), allowed_uids=frozenset({os.getuid()}),
                                  scope=LauncherScope(vms_dir=root / "lvms", run_root=run,
                                                      image_roots=(image.parent,))))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = replace(settings.engine_config(spec, image), run_dir=run, memory_mib=512,
                     isolation=settings.jail_policy(spec))
    # The remote one takes the path an unprivileged API takes, from this root process.
    direct, remote = Engine(config), Engine(config, launcher=RemoteLauncher(socket_path))
    samples: dict[str, list[float]] = {"jailed, started here": [], "jailed, through the launcher": []}
    try:
        for _ in range(max(2, runs // 2)):
            for name, engine in (("jailed, started here", direct), ("jailed, through the launcher", remote)):
                started = time.perf_counter()
                sandbox = engine.boot()
                samples[name].append(time.perf_counter() - started)
                sandbox.close()
    finally:
        server.shutdown()
        server.server_close()
    base = statistics.median(samples["jailed, started here"])
    return [(f"cold boot, {name}", p50_ms(values), f"{statistics.median(values) / base:.2f}×")
            for name, values in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    spec = load_spec()
    image = guest_image_dir(spec)
    root = Path(tempfile.mkdtemp(prefix="appl-nb-", dir="/dev/shm"))
    try:
        rows = service_rows(image, root, args.runs) + launcher_rows(spec, image, root, args.runs)
    finally:
        kill_qemus_under(root)
        shutil.rmtree(root, ignore_errors=True)
    print_rows(rows, ("measure", "p50", "ratio"))


if __name__ == "__main__":
    main()
