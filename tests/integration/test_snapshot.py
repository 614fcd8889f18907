"""Freeze/resume and fork(n) on real microVMs: state kept exactly, failures leave the source as it was."""

from __future__ import annotations

import time

import pytest

from service.engine.snapshot import Snapshot, SnapshotMismatch, fork, freeze, resume
from tests.configs import exec_limits
from tests.vmtools import qemu_pids_under

pytestmark = pytest.mark.integration
LIMITS = exec_limits(timeout_s=60)

SETUP = (
    "import random, numpy as np\n"
    "from sklearn.linear_model import LinearRegression\n"
    "x = 41\n"
    "model = LinearRegression().fit(np.arange(6.0).reshape(-1, 1), np.arange(6.0) * 2 + 1)\n"
    "open('/data/notes.txt', 'w').write('written before')\n"
    "random.seed(0); np.random.seed(0)"
)
CHECK = "(x, round(float(model.predict([[10.0]])[0]), 6), open('/data/notes.txt').read())"


@pytest.fixture
def source(engine):
    sandbox = engine.boot(memory_mib=512)
    assert sandbox.run_code(SETUP).error is None
    yield sandbox
    sandbox.close()


def test_freeze_then_resume_keeps_process_state(engine, source, run_dir):
    expected = source.run_code(CHECK).text
    snapshot = freeze(source, run_dir / "snap", engine.image.image_id, compress=True)
    assert source.closed and qemu_pids_under(source.vm.dir) == []
    reloaded = Snapshot.load(run_dir / "snap")  # as after a service restart: only what is on disk
    with resume(reloaded, run_dir, LIMITS, engine.image.image_id, launcher=engine.launcher) as again:
        assert again.run_code(CHECK).text == expected
        assert abs(float(again.run_code("import time; time.time()").text) - time.time()) < 1.0
    assert snapshot.size_bytes > 0


def test_snapshot_of_another_image_is_refused(engine, source, run_dir):
    snapshot = freeze(source, run_dir / "snap", engine.image.image_id)
    with pytest.raises(SnapshotMismatch, match="guest image"):
        resume(snapshot, run_dir, LIMITS, image_id="0123456789abcdef")
    snapshot.meta["qemu_version"] = "QEMU emulator version 1.0"
    with pytest.raises(SnapshotMismatch, match=r"QEMU emulator version 1\.0"):
        resume(snapshot, run_dir, LIMITS, engine.image.image_id, launcher=engine.launcher)


def test_failed_freeze_leaves_the_sandbox_running_and_no_snapshot(engine, source, run_dir):
    def crash():
        raise RuntimeError("injected failure after the state was written")

    with pytest.raises(RuntimeError, match="injected"):
        freeze(source, run_dir / "snap", engine.image.image_id, fail_after_stream=crash)
    assert not (run_dir / "snap").exists() and not (run_dir / "snap.partial").exists()
    assert source.run_code("x").text == "41"


def test_fork_copies_state_and_clones_diverge(engine, source, run_dir):
    expected = source.run_code(CHECK).text
    template, clones = fork(source, 2, run_dir / "templates", run_dir, LIMITS, launcher=engine.launcher)
    try:
        for clone in clones:
            assert clone.run_code(CHECK).text == expected
        clones[0].run_code("x += 1; open('/data/notes.txt', 'w').write('changed in clone 0')")
        assert clones[1].run_code(CHECK).text == expected
        assert source.run_code(CHECK).text == expected
        draws = {sb.run_code("(random.random(), float(np.random.rand()))").text for sb in (source, *clones)}
        assert len(draws) == 3
        grand_template, grandkids = fork(clones[0], 2, run_dir / "templates", run_dir, LIMITS, launcher=engine.launcher)
        try:
            assert {g.run_code("x").text for g in grandkids} == {"42"}
        finally:
            for g in grandkids:
                g.close()
            grand_template.remove()
    finally:
        for clone in clones:
            clone.close()
        template.remove()
    assert not any((run_dir / "templates").glob("tpl-*"))
