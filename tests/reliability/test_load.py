"""Load, the short version: bench/load_bench.py --short against the package's live service (Locust runs in a process
of its own: it patches the standard library with gevent). It fails on any undocumented answer (every 5xx, a 429/503
without Retry-After, a transport error), on any exec whose output is not what the code must print, and on any lost
one. `make load` runs the long version and prints the tables (docs/reliability.md has its figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import delete_all

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HANG_DEADLINE_S = 900  # the short run takes about 2 minutes here; only a hang reaches this


@pytest.fixture(scope="module")
def short_load(live, tmp_path_factory):
    delete_all(live)  # what the fuzz module may have left
    report = tmp_path_factory.mktemp("load") / "load.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load_bench.py"), "--short", "--url", live.url,
         "--keys", f"{live.key},{live.other_key}", "--run-dir", str(live.run_dir), "--json", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_DEADLINE_S,
    )
    print(run.stdout[-6000:])
    assert report.exists(), f"load_bench.py wrote no report (exit {run.returncode}):\n{run.stderr[-4000:]}"
    yield json.loads(report.read_text()), run
    delete_all(live)


def _runs(results):
    return {"mixed": results["mixed"], "burst": results["burst"], "idle alone": results["idle"]["quiet"],
            "idle beside": results["idle"]["loaded"]}


def test_every_answer_under_load_is_documented(short_load):
    results, _run = short_load
    for name, run in _runs(results).items():
        assert run["outcomes"]["undocumented"] == {}, f"{name}: {run['outcomes']['undocumented']}"


def test_no_exec_output_is_wrong_or_lost_under_load(short_load):
    results, _run = short_load
    for name, run in _runs(results).items():
        outcome = run["outcomes"]
        assert outcome["wrong_output_count"] == 0, f"{name}: {outcome['wrong_outputs']}"
        assert outcome["lost_outputs"] == 0, name
    mixed = results["mixed"]["outcomes"]
    assert mixed["execs_checked"] > 0 and results["idle"]["loaded"]["outcomes"]["execs_checked"] > 0
    # every kind of call of scenario (a) was made and answered as expected at least once
    assert {"create", "exec", "file write", "file read", "fork", "exec in fork", "freeze", "resume",
            "delete"} <= set(mixed["ok"]), mixed["ok"]


def test_the_benchmark_exits_zero_and_prints_its_tables(short_load):
    _results, run = short_load
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "hot exec beside" in run.stdout and "execs checked" in run.stdout
