"""Execution API benchmark: create and exec through a real `appliance serve`, against a local Jupyter kernel.

    .venv/bin/python bench/api_bench.py [--execs 500] [--creates 20]

One run measures, side by side:
  - create -> first exec, with a warm pool (a create is a hand-out) and without one (a clone of the template);
  - hot exec `x=1` through the API (HTTP keep-alive), through the service core without HTTP (SandboxManager),
    and through the engine alone (Sandbox.run_code on an attached sandbox);
  - a local Jupyter kernel (ipykernel via jupyter_client, no isolation) doing `x=1`: the floor a user might pick.
"server" columns come from the API's Server-Timing header (time inside the app, excluding the network).
Ratios matter more than absolute numbers: this machine is shared and noisy, and VMs may run under TCG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tables import ms, percentile  # bench/, the script's own directory

from tests.live_service import LiveService


@dataclass
class Row:
    name: str
    client: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)


def fmt(samples: list[float], q: float) -> str:
    return ms(percentile(samples, q)) if samples else "-"


def server_seconds(response: httpx.Response) -> float:
    timing = response.headers.get("Server-Timing", "")
    for part in timing.split(";"):
        if part.startswith("dur="):
            return float(part[4:]) / 1000
    return 0.0


def creates(live: LiveService, count: int, wait_pool: bool, label: str) -> list[Row]:
    create, first, total = Row(f"create ({label})"), Row(f"first exec after create ({label})"), \
        Row(f"create -> first exec ({label})")
    with live.client() as api:
        for _ in range(count):
            if wait_pool:
                live.wait_pool_full()
            else:
                time.sleep(0.3)  # let the previous VM's teardown settle
            started = time.perf_counter()
            made = api.post("/v1/sandboxes")
            created = time.perf_counter()
            made.raise_for_status()
            sandbox_id = made.json()["id"]
            ran = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 1"})
            done = time.perf_counter()
            ran.raise_for_status()
            create.client.append(created - started)
            create.server.append(server_seconds(made))
            first.client.append(done - created)
            first.server.append(server_seconds(ran))
            total.client.append(done - started)
            total.server.append(server_seconds(made) + server_seconds(ran))
            api.delete(f"/v1/sandboxes/{sandbox_id}")
    return [create, first, total]


def hot_execs(live: LiveService, count: int) -> list[Row]:
    via_api = Row("hot exec x=1 via API (HTTP keep-alive)")
    core = Row("hot exec x=1, service core, no HTTP")
    engine = Row("hot exec x=1, engine Sandbox.run_code")
    with live.client() as api:
        sandbox_id = api.post("/v1/sandboxes").json()["id"]
        for _ in range(20):  # warm the connection and both workers' agent channels
            api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 1"})
        for _ in range(count):
            started = time.perf_counter()
            response = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 1"})
            via_api.client.append(time.perf_counter() - started)
            via_api.server.append(server_seconds(response))
        # The same sandbox from this process, as a worker reaches it: registry + agent port of its own.
        for name, value in live.env.items():
            os.environ[name] = value
        from service.engine.deployment_secret import read_or_create
        from service.keys import derived_id
        from service.manager import SandboxManager
        from service.settings import load_service_config

        config = load_service_config()
        manager = SandboxManager(config)
        owner = derived_id(read_or_create(config.secret_file), live.key)
        try:
            for _ in range(20):
                manager.exec(owner, sandbox_id, "x = 1")
            for _ in range(count):
                started = time.perf_counter()
                manager.exec(owner, sandbox_id, "x = 1")
                core.client.append(time.perf_counter() - started)
            sandbox = manager._attach(manager.get(owner, sandbox_id))  # the engine object the manager drives
            for _ in range(count):
                started = time.perf_counter()
                sandbox.run_code("x = 1")
                engine.client.append(time.perf_counter() - started)
        finally:
            manager.close()
        api.delete(f"/v1/sandboxes/{sandbox_id}")
    return [via_api, core, engine]


def jupyter_baseline(count: int) -> list[Row]:
    import subprocess

    from jupyter_client.manager import start_new_kernel

    def quiet(msg: dict) -> None:  # outputs are not the point; keep them off the table
        pass

    start = Row("local Jupyter kernel: start -> first reply")
    imports = Row("local Jupyter kernel: import pandas, sklearn")
    hot = Row("local Jupyter kernel: x=1 (no isolation)")
    started = time.perf_counter()
    manager, client = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL)
    try:
        client.execute_interactive("1", timeout=60, output_hook=quiet)
        start.client.append(time.perf_counter() - started)
        started = time.perf_counter()
        reply = client.execute_interactive("import pandas, sklearn, sklearn.linear_model", timeout=120,
                                           output_hook=quiet)
        if reply["content"]["status"] == "ok":
            imports.client.append(time.perf_counter() - started)
        else:
            imports.name += " (not installed on this host)"
        for _ in range(20):
            client.execute_interactive("x = 1", timeout=10, output_hook=quiet)
        for _ in range(count):
            started = time.perf_counter()
            reply = client.execute_interactive("x = 1", timeout=10, output_hook=quiet)
            hot.client.append(time.perf_counter() - started)
            assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return [start, imports, hot]


def print_table(rows: list[Row]) -> None:
    width = max(len(row.name) for row in rows) + 2
    print(f"{'measure':<{width}}{'n':>6}{'p50':>12}{'p99':>12}{'server p50':>14}{'server p99':>14}")
    for row in rows:
        print(f"{row.name:<{width}}{len(row.client):>6}{fmt(row.client, 50):>12}{fmt(row.client, 99):>12}"
              f"{fmt(row.server, 50):>14}{fmt(row.server, 99):>14}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=500, help="hot execs per measure (default 500)")
    parser.add_argument("--creates", type=int, default=20, help="creates per measure (default 20)")
    args = parser.parse_args()

    rows: list[Row] = []
    print("starting the service (warming the template)...", file=sys.stderr)
    live = LiveService(workers=2, pool_size=2, env_extra={"APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": "64"})
    live.start()
    try:
        print("creates from the pool...", file=sys.stderr)
        rows += creates(live, args.creates, wait_pool=True, label="from pool")
        print("hot execs...", file=sys.stderr)
        rows += hot_execs(live, args.execs)
        print("restarting without a pool; creates from the template...", file=sys.stderr)
        live.restart(pool_size=0)
        rows += creates(live, args.creates, wait_pool=False, label="from template, no pool")
    finally:
        live.stop()
    print("local Jupyter kernel...", file=sys.stderr)
    rows += jupyter_baseline(args.execs)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
