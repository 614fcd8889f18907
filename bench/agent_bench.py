"""Guest agent benchmark: the agent run on this host over --stdio (no VM), against a plain REPL over a pipe.

    .venv/bin/python bench/agent_bench.py [--calls 300]

What the unit tests in tests/unit/test_agent.py prove works, measured here for speed: the exec round trip,
50 MB of output through the output cap, and how soon a timeout, a kill after the grace period and the kill of
a bash command's process group come back as `done`. Ratios matter more than absolute numbers: this machine is
shared and noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine_bench import local_repl_round_trips, ms, percentile, time_calls  # bench/, the script's own directory
from tables import print_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.agent_harness import AgentProcess

HUGE_OUTPUT = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)"
IGNORES_INTERRUPT = "while True:\n    try:\n        while True:\n            pass\n    except KeyboardInterrupt:\n" \
    "        pass"


def seconds_of(agent: AgentProcess, code: str, **args: object) -> float:
    started = time.perf_counter()
    agent.run(code, **args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    agent = AgentProcess.start()
    rows: list[tuple[str, str, str]] = []
    try:
        agent.hello()
        time_calls(lambda: agent.run("x = 1"), 50)
        samples = time_calls(lambda: agent.run("x = 1"), args.calls)
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        rows.append(("x=1 round trip (agent)", f"p50 {ms(p50)} / p99 {ms(p99)}", f"{args.calls} calls, ≤ 5 ms p50"))
        output = [seconds_of(agent, HUGE_OUTPUT, output_cap=1_000_000) for _ in range(3)]
        rows.append(("50 MB output, 1 MB cap", ms(min(output)), "best of 3, ≤ 5 s"))
        timeout = seconds_of(agent, "import time\ntime.sleep(3600)", timeout_s=0.3, grace_s=5)
        rows.append(("timeout 0.3 s → done", ms(timeout), "interrupt, namespace kept; ≤ 3 s"))
        grace = seconds_of(agent, IGNORES_INTERRUPT, timeout_s=0.3, grace_s=0.4)
        rows.append(("timeout 0.3 s + grace 0.4 s → done", ms(grace), "worker killed and restarted; ≤ 5 s"))
        bash = seconds_of(agent, "sleep 3600 & sleep 3600", language="bash", timeout_s=0.3)
        rows.append(("bash timeout 0.3 s → done", ms(bash), "process group killed; ≤ 3 s"))
    finally:
        agent.close()
    baseline = local_repl_round_trips(args.calls)
    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    rows.append(("x=1 local REPL over a pipe", f"p50 {ms(b50)} / p99 {ms(b99)}", "baseline, no agent"))
    rows.append(("agent / baseline (p50)", f"{p50 / b50:.1f}×", "cost of the protocol and the worker"))
    print("\nguest agent benchmark — on this host, over --stdio")
    print_rows(rows)


if __name__ == "__main__":
    main()
