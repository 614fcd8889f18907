"""The engine against real microVMs booted from the real guest image (TCG here, KVM where it works)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.engine import BootFailed, Sandbox, SandboxBusy
from tests.vmtools import qemu_pids_under

pytestmark = pytest.mark.integration

HANG_DEADLINE_S = 60  # waits that only a hang reaches, however slow this host is


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
    # The code then sleeps until interrupted, and the test interrupts it only once both lines have reached the
    # host: had they come with the end of the code, the exec would end in its timeout (a TimeoutError) instead.
    code = "import sys, time\nprint('first')\nsys.stdout.flush()\nprint('oops', file=sys.stderr)\ntime.sleep(3600)"
    events = []

    def on_event(event):
        events.append(event["ev"])
        if sorted(events) == ["stderr", "stdout"]:
            sandbox.interrupt()

    result = sandbox.run_code(code, timeout_s=HANG_DEADLINE_S, on_event=on_event)
    assert result.error["name"] == "KeyboardInterrupt", result.error
    assert result.stdout == "first\n" and result.stderr == "oops\n"
    assert events[-1] == "done"


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

    running = threading.Event()
    results = []
    code = "import time\nprint('go', flush=True)\ntime.sleep(3600)"

    def slow():
        results.append(sandbox.run_code(code, timeout_s=HANG_DEADLINE_S, on_event=lambda event: running.set()))

    runner = threading.Thread(target=slow)
    runner.start()
    try:
        assert running.wait(HANG_DEADLINE_S), "the first exec never started"
        with pytest.raises(SandboxBusy):
            sandbox.run_code("1")
    finally:
        sandbox.interrupt()
        runner.join(HANG_DEADLINE_S * 2)
    # It ran on until the test ended it (not its timeout), untouched by the refused one.
    assert results[0].stdout == "go\n" and results[0].error["name"] == "KeyboardInterrupt"


def test_boot_timeout_is_a_clean_error_with_no_stray_process(engine, run_dir):
    # A guest that never gets ready, however fast it boots: its init runs a shell on the console (the image's
    # debugging switch) instead of the agent, so the boot deadline is always what ends the wait.
    machine = engine.machine()
    never_ready = replace(machine, extra_kernel_args=(*machine.extra_kernel_args, "appliance.debug=shell"))
    with pytest.raises(BootFailed, match="did not become ready"):
        Sandbox.boot(never_ready, run_dir, engine.config.limits, boot_timeout_s=5, launcher=engine.launcher)
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
