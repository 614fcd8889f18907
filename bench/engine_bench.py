"""Engine benchmark: boot, imports, exec round trips, against a local Python REPL over a pipe in the same run.

    .venv/bin/python bench/engine_bench.py [--calls 300] [--boots 3]

Prints a table. Ratios matter more than absolute numbers: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tables import ms, percentile, print_rows  # bench/, the script's own directory

from appliance.spec import load_spec
from service import settings
from service.engine import Engine

# A minimal REPL over a pipe: the floor for "send code, get an answer" with no VM and no isolation.
_LOCAL_REPL = r"""
import sys, json
ns = {}
for line in sys.stdin:
    code = json.loads(line)
    try:
        result = repr(eval(code, ns))
    except SyntaxError:
        exec(code, ns); result = None
    sys.stdout.write(json.dumps(result) + "\n"); sys.stdout.flush()
"""


def time_calls(fn, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def local_repl_round_trips(calls: int) -> list[float]:
    process = subprocess.Popen(
        [sys.executable, "-c", _LOCAL_REPL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        def one() -> None:
            process.stdin.write('"x = 1"\n')
            process.stdin.flush()
            process.stdout.readline()

        time_calls(one, 20)
        return time_calls(one, calls)
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    spec = load_spec()
    run_dir = Path(tempfile.mkdtemp(prefix="appliance-bench-", dir="/dev/shm"))
    engine = Engine(replace(settings.engine_config(spec), run_dir=run_dir))
    rows: list[tuple[str, str, str]] = []
    try:
        accelerator = engine.accelerator
        boots = []
        for _ in range(args.boots):
            started = time.perf_counter()
            sandbox = engine.boot(die_with_parent=True)
            boots.append(time.perf_counter() - started)
            sandbox.close()
        rows.append(("cold boot → agent ready", ms(statistics.median(boots)), f"median of {args.boots}, ≤ 3 s"))

        with engine.boot(die_with_parent=True) as sandbox:
            started = time.perf_counter()
            result = sandbox.run_code("import pandas, sklearn, numpy")
            rows.append(("import pandas, sklearn", ms(time.perf_counter() - started), "first import in a fresh VM"))
            assert result.error is None, result.error
            time_calls(lambda: sandbox.run_code("x = 1"), 20)
            samples = time_calls(lambda: sandbox.run_code("x = 1"), args.calls)
            p50, p99 = percentile(samples, 50), percentile(samples, 99)
            rows.append(
                ("x=1 round trip (engine)", f"p50 {ms(p50)} / p99 {ms(p99)}", f"{args.calls} calls, ≤ 1 ms p50")
            )
            sandbox.run_code("import pandas as pd, numpy as np; df = pd.DataFrame(np.random.rand(100, 4))")
            describe = time_calls(lambda: sandbox.run_code("print(df.describe())"), 20)
            rows.append(("print(df.describe())", f"p50 {ms(percentile(describe, 50))}", "100-row frame, 20 calls"))

        started = time.perf_counter()
        template = engine.make_template(agent_ports=1, warm_code="import pandas, sklearn, numpy")
        rows.append(("template: boot + warm + save", ms(time.perf_counter() - started), "once per service start"))
        clone_times = []
        for index in range(5):
            started = time.perf_counter()
            with engine.clone(template, f"bench-clone-{index}") as clone:
                clone.run_code("x = 1")
                clone_times.append(time.perf_counter() - started)
        rows.append(("clone → first exec", f"p50 {ms(percentile(clone_times, 50))}", "5 clones, ≤ 150 ms"))
        template.remove()

        baseline = local_repl_round_trips(args.calls)
        b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
        rows.append(("x=1 local REPL over a pipe", f"p50 {ms(b50)} / p99 {ms(b99)}", "baseline, no VM"))
        rows.append(("engine / baseline (p50)", f"{p50 / b50:.1f}×", "cost of the VM boundary"))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    print(f"\nengine benchmark — accelerator: {accelerator.name} ({accelerator.reason})")
    print_rows(rows)


if __name__ == "__main__":
    main()
