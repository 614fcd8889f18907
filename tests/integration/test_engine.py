"""The engine against real microVMs booted from the real guest image (TCG here, KVM where it works)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from service.engine import BootFailed, Sandbox, SandboxBusy
from tests.vmtools import qemu_pids_under

pytestmark = pytest.mark.integration


def test_accelerator_is_chosen_and_explained(engine):
    choice = engine.accelerator
    assert choice.name in {"kvm", "tcg"}
    assert choice.reason
    if choice.name == "tcg" and engine.config.accelerator == "auto":
        assert "KVM not usable" in choice.reason


def test_pandas_and_sklearn_fit_predict(sandbox):
    result = sandbox.run_code(
        "import pandas as pd, numpy as np\n"
        "from sklearn.linear_model import LinearRegression\n"
        "df = pd.DataFrame({'x': np.arange(10.0)}); df['y'] = 3 * df.x + 1\n"
        "model = LinearRegression().fit(df[['x']], df.y)\n"
        "round(float(model.predict(pd.DataFrame({'x': [20.0]}))[0]), 6)"
    )
    assert result.error is None, result.error
    assert result.text == "61.0"


def test_state_persists_across_calls(sandbox):
    assert sandbox.run_code("counter = 41").error is None
    sandbox.run_code("counter += 1")
    assert sandbox.run_code("counter").text == "42"


def test_exception_gives_traceback_and_sandbox_stays_usable(sandbox):
    sandbox.run_code("kept = 'yes'")
    result = sandbox.run_code("def f():\n    return 1 / 0\nf()")
    assert result.error["name"] == "ZeroDivisionError"
    assert "return 1 / 0" in result.error["traceback"]
    assert sandbox.run_code("kept").text == "'yes'"


def test_stdout_stderr_and_streaming_order(sandbox):
    events = []
    result = sandbox.run_code(
        "import sys, time\nprint('first')\nsys.stdout.flush()\ntime.sleep(0.5)\nprint('oops', file=sys.stderr)",
        on_event=lambda e: events.append((time.monotonic(), e)),
    )
    assert result.stdout == "first\n" and result.stderr == "oops\n"
    first_out = next(t for t, e in events if e.get("ev") == "stdout")
    done = next(t for t, e in events if e.get("ev") == "done")
    assert done - first_out > 0.3  # 'first' arrived while the code was still sleeping


def test_timeout_interrupts_and_keeps_state(sandbox):
    sandbox.run_code("before_timeout = 7")
    result = sandbox.run_code("import time\nwhile True: time.sleep(0.05)", timeout_s=1.0)
    assert result.error["name"] == "TimeoutError"
    assert not result.worker_restarted
    assert sandbox.run_code("before_timeout").text == "7"


def test_os_exit_is_reported_and_next_call_gets_a_fresh_namespace(sandbox):
    sandbox.run_code("doomed = 1")
    result = sandbox.run_code("import os; os._exit(3)")
    assert result.worker_restarted
    assert "exited with code 3" in (result.worker_exit or "")
    after = sandbox.run_code("'doomed' in globals()")
    assert after.text == "False"
    assert sandbox.run_code("1 + 1").text == "2"


def test_big_output_is_capped_with_a_marker(sandbox):
    result = sandbox.run_code("import sys\nsys.stdout.write('x' * (50 * 1024 * 1024))", timeout_s=120)
    assert result.error is None
    kept = len(result.stdout) + len(result.stderr)
    assert kept < sandbox.limits.output_cap + 1024
    assert result.truncated_bytes >= 50 * 1024 * 1024 - sandbox.limits.output_cap
    assert "output truncated" in result.stdout + result.stderr


def test_bash_runs_with_exit_code(sandbox):
    result = sandbox.run_code("echo hi; exit 4", language="bash")
    assert result.stdout == "hi\n" and result.exit_code == 4


def test_concurrent_exec_is_refused(sandbox):
    import threading

    started = threading.Event()

    def slow():
        started.set()
        sandbox.run_code("import time; time.sleep(1.5)")

    runner = threading.Thread(target=slow)
    runner.start()
    started.wait()
    time.sleep(0.3)
    with pytest.raises(SandboxBusy):
        sandbox.run_code("1")
    runner.join()


def test_boot_timeout_is_a_clean_error_with_no_stray_process(engine, run_dir):
    machine = engine.machine()
    with pytest.raises(BootFailed, match="did not become ready"):
        Sandbox.boot(machine, run_dir, engine.config.limits, boot_timeout_s=0.5, launcher=engine.launcher)
    assert qemu_pids_under(run_dir) == []
    assert list(run_dir.iterdir()) == []


def test_qemu_failure_is_reported(engine, run_dir):
    broken = replace(engine.machine(), rootfs=run_dir / "missing.ext4")
    with pytest.raises(BootFailed, match="QEMU"):
        Sandbox.boot(broken, run_dir, engine.config.limits, boot_timeout_s=30, launcher=engine.launcher)
    assert qemu_pids_under(run_dir) == []


def test_close_leaves_nothing(engine):
    sandbox = engine.boot()
    vm_dir = sandbox.vm.dir
    assert sandbox.run_code("1").text == "1"
    sandbox.close()
    assert not vm_dir.exists()
    assert qemu_pids_under(vm_dir) == []
