"""Load benchmark: the Locust users of bench/locustfile.py against a real `appliance serve`, three scenarios, tables.

    .venv/bin/python bench/load_bench.py              # make load: (a) 32 clients x 10 min, (b) 64 idle + 8 exec,
                                                      # (c) a burst of 100 creates, on a service of its own
    .venv/bin/python bench/load_bench.py --short      # the ~2-minute version tests/reliability/test_load.py runs
    .venv/bin/python bench/load_bench.py --url URL --keys K1,K2 --run-dir DIR --json OUT.json   # a running service

(a) mixed: concurrent clients, each on its own sandbox: create, checked exec, files, fork, freeze/resume, delete.
(b) idle: hot exec p50 of a few clients alone, then again while N sandboxes sit idle; idle CPU per VM.
(c) burst: N creates at once, each with its first exec checked.
Each prints calls/s, p50/p99 per call kind, refusals by code, undocumented answers, wrong and lost outputs, and the
host's CPU and memory. Locust runs here as a library (gevent), so this is a process of its own, never pytest's.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 (after gevent's patching, as locust needs)
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import locustfile  # noqa: E402 (bench/, this script's own directory)
from locust import events  # noqa: E402
from locust.env import Environment  # noqa: E402
from tables import ms, print_rows  # noqa: E402

LONG = {"clients": 32, "duration": 600, "idle": 64, "hot": 8, "phase": 60, "burst": 100}
SHORT = {"clients": 8, "duration": 45, "idle": 4, "hot": 2, "phase": 12, "burst": 6}
IDLE_CPU_WINDOW_S = 10


# ---- the host --------------------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _mem_used_mib() -> float:
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def qemu_cpu_seconds(run_dir: str | None) -> tuple[float, int]:
    """CPU time of every QEMU whose command line names `run_dir` (this service's VMs), and how many there are."""
    total, count, tick = 0.0, 0, 100.0
    if not run_dir:
        return 0.0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"qemu-system" not in cmdline.split(b"\0", 1)[0] or run_dir.encode() not in cmdline:
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / tick
        count += 1
    return total, count


class HostSampler:
    """Host CPU busy % and memory in use, once a second, in a greenlet beside the users."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.mem_start = _mem_used_mib()
        self.mem_peak = self.mem_start
        self._greenlet = gevent.spawn(self._loop)

    def _loop(self) -> None:
        busy, total = _cpu_ticks()
        while True:
            gevent.sleep(1)
            busy2, total2 = _cpu_ticks()
            if total2 > total:
                self.cpu.append(100 * (busy2 - busy) / (total2 - total))
            busy, total = busy2, total2
            self.mem_peak = max(self.mem_peak, _mem_used_mib())

    def stop(self) -> dict[str, float]:
        self._greenlet.kill()
        return {"cpu_mean_pct": sum(self.cpu) / len(self.cpu) if self.cpu else 0.0,
                "cpu_peak_pct": max(self.cpu, default=0.0), "mem_start_mib": self.mem_start,
                "mem_peak_mib": self.mem_peak}


# ---- running users ---------------------------------------------------------------------------------------------------


def run_users(url: str, user_class, users: int, spawn_rate: float, duration_s: float | None) -> dict:
    """Run `users` of `user_class` for `duration_s` (None: until every user stopped by itself); the figures."""
    locustfile.OUTCOMES = locustfile.Outcomes()
    env = Environment(user_classes=[user_class], host=url, events=events)
    runner = env.create_local_runner()
    sampler = HostSampler()
    started = time.monotonic()
    runner.start(users, spawn_rate=spawn_rate)
    if duration_s is not None:
        gevent.sleep(duration_s)
    else:
        gevent.sleep(1)
        deadline = started + 900
        while runner.user_count > 0 and time.monotonic() < deadline:
            gevent.sleep(0.5)
    runner.quit()
    wall = time.monotonic() - started
    host = sampler.stop()
    kinds = {}
    for (name, _method), entry in sorted(env.stats.entries.items()):
        kind = kinds.setdefault(name, {"calls": 0, "failures": 0, "times": []})
        kind["calls"] += entry.num_requests
        kind["failures"] += entry.num_failures
        kind["p50_s"] = entry.get_response_time_percentile(0.5) / 1000
        kind["p99_s"] = entry.get_response_time_percentile(0.99) / 1000
    for kind in kinds.values():
        kind.pop("times")
        kind["per_s"] = kind["calls"] / wall
    total = sum(kind["calls"] for kind in kinds.values())
    return {"wall_s": wall, "calls": total, "calls_per_s": total / wall, "kinds": kinds, "host": host,
            "outcomes": locustfile.OUTCOMES.as_json()}


def scenario_mixed(url: str, clients: int, duration_s: float) -> dict:
    return run_users(url, locustfile.MixedUser, clients, spawn_rate=max(1, clients / 8), duration_s=duration_s)


def _hold_idle(url: str, keys: list[str], count: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    held, refused = [], {}
    for index in range(count):
        key = keys[index % len(keys)]
        for _attempt in range(30):
            made = httpx.post(f"{url}/v1/sandboxes", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                              json={"metadata": {"load": "idle"}})
            if made.status_code == 201:
                held.append((key, made.json()["id"]))
                break
            refused[str(made.status_code)] = refused.get(str(made.status_code), 0) + 1
            if made.status_code not in (429, 503):
                break
            gevent.sleep(float(made.headers.get("Retry-After", "1")))
    return held, refused


def scenario_idle(url: str, keys: list[str], run_dir: str | None, idle: int, hot: int, phase_s: float) -> dict:
    quiet = run_users(url, locustfile.HotExecUser, hot, spawn_rate=hot, duration_s=phase_s)
    held, refused = _hold_idle(url, keys, idle)
    try:
        before, vms = qemu_cpu_seconds(run_dir)
        gevent.sleep(IDLE_CPU_WINDOW_S)
        after, _ = qemu_cpu_seconds(run_dir)
        idle_cpu_pct = 100 * (after - before) / IDLE_CPU_WINDOW_S / max(vms, 1)
        loaded = run_users(url, locustfile.HotExecUser, hot, spawn_rate=hot, duration_s=phase_s)
    finally:
        for key, sandbox in held:
            httpx.delete(f"{url}/v1/sandboxes/{sandbox}", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    p50 = lambda run: run["kinds"].get("exec", {}).get("p50_s", 0.0)  # noqa: E731
    return {"quiet": quiet, "loaded": loaded, "idle_held": len(held), "idle_refused": refused,
            "idle_cpu_pct_per_vm": idle_cpu_pct, "vms_measured": vms,
            "hot_p50_ratio": p50(loaded) / p50(quiet) if p50(quiet) else None}


def scenario_burst(url: str, creates: int) -> dict:
    return run_users(url, locustfile.BurstCreator, creates, spawn_rate=creates, duration_s=None)


# ---- reporting -------------------------------------------------------------------------------------------------------


def _rows(title: str, run: dict) -> list[tuple[str, ...]]:
    rows = [(f"{title}: all calls", str(run["calls"]), f"{run['calls_per_s']:.1f}", "", "", "")]
    for name, kind in run["kinds"].items():
        rows.append((f"  {name}", str(kind["calls"]), f"{kind['per_s']:.2f}", ms(kind["p50_s"]), ms(kind["p99_s"]),
                     str(kind["failures"])))
    return rows


def print_report(results: dict) -> None:
    rows = []
    for title, run in (("(a) mixed", results.get("mixed")), ("(c) burst", results.get("burst"))):
        if run:
            rows += _rows(title, run)
    idle = results.get("idle")
    if idle:
        rows += _rows("(b) hot exec alone", idle["quiet"])
        rows += _rows(f"(b) hot exec beside {idle['idle_held']} idle", idle["loaded"])
    print_rows(rows, headers=("scenario / call", "calls", "per s", "p50", "p99", "refused+failed"))
    print()
    summary = []
    for name, run in _runs(results):
        outcome, host = run["outcomes"], run["host"]
        summary.append((name, str(outcome["execs_checked"]), str(outcome["wrong_output_count"]),
                        str(outcome["lost_outputs"]), _codes(outcome["documented"]), _codes(outcome["undocumented"]),
                        f"{host['cpu_mean_pct']:.0f}%", f"{host['mem_peak_mib'] - host['mem_start_mib']:+.0f} MiB"))
    print_rows(summary, headers=("run", "execs checked", "wrong", "lost", "refused (documented)", "undocumented",
                                 "host CPU", "host mem peak"))
    if idle:
        ratio = idle["hot_p50_ratio"]
        print(f"\nidle CPU per VM of the service: {idle['idle_cpu_pct_per_vm']:.2f}% of a core "
              f"({idle['vms_measured']} VMs); hot exec p50 beside {idle['idle_held']} idle / alone: "
              + (f"{ratio:.2f}x" if ratio else "-"))


def _codes(counter: dict) -> str:
    return ", ".join(f"{label} x{count}" for label, count in sorted(counter.items())) or "-"


def _runs(results: dict):
    for name in ("mixed", "burst"):
        if results.get(name):
            yield name, results[name]
    if results.get("idle"):
        yield "idle: alone", results["idle"]["quiet"]
        yield "idle: beside", results["idle"]["loaded"]


def failures(results: dict) -> list[str]:
    """What makes a run fail: undocumented answers, wrong or lost outputs (refusals that are documented are fine)."""
    found = []
    for name, run in _runs(results):
        outcome = run["outcomes"]
        if outcome["undocumented"]:
            found.append(f"{name}: undocumented answers {outcome['undocumented']}")
        if outcome["wrong_output_count"] or outcome["lost_outputs"]:
            found.append(f"{name}: {outcome['wrong_output_count']} wrong and {outcome['lost_outputs']} lost outputs: "
                         f"{outcome['wrong_outputs'][:3]}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the small version the test suite runs")
    parser.add_argument("--url", help="a running service (else one is started here)")
    parser.add_argument("--keys", help="its two API keys, comma-separated")
    parser.add_argument("--run-dir", help="its run dir (to find its QEMU processes for idle CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--scenarios", default="mixed,idle,burst")
    for name, value in LONG.items():
        parser.add_argument(f"--{name}", type=int, help=f"(long default {value}, short {SHORT[name]})")
    args = parser.parse_args()
    sizes = {name: getattr(args, name) or (SHORT if args.short else LONG)[name] for name in LONG}
    live = None
    if args.url is None:
        from tests.live_service import LiveService

        needed = max(sizes["clients"] * 2, sizes["idle"] + sizes["hot"], sizes["burst"]) + 8
        live = LiveService(workers=2, pool_size=2, env_extra={
            "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": str(needed), "APPLIANCE_SERVICE__MAX_SANDBOXES": str(needed),
        }).start()
        url, keys, run_dir = live.url, [live.key, live.other_key], str(live.run_dir)
    else:
        url, keys, run_dir = args.url, (args.keys or "").split(","), args.run_dir
    locustfile._KEYS = itertools.cycle(keys)
    results: dict = {"sizes": sizes}
    try:
        scenarios = args.scenarios.split(",")
        if "mixed" in scenarios:
            results["mixed"] = scenario_mixed(url, sizes["clients"], sizes["duration"])
        if "idle" in scenarios:
            results["idle"] = scenario_idle(url, keys, run_dir, sizes["idle"], sizes["hot"], sizes["phase"])
        if "burst" in scenarios:
            results["burst"] = scenario_burst(url, sizes["burst"])
    finally:
        if live is not None:
            live.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_report(results)
    problems = failures(results)
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
