"""Freeze/resume and fork(n) on real microVMs: state kept exactly, failures leave the source as it was."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from service.engine import SnapshotMismatch, SnapshotTampered
from service.engine.snapshot import META, _signature, _stream_full_state, fork, freeze
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


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # read(), not a mapping: reading a tmpfs hole this way allocates nothing
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def source(engine):
    sandbox = engine.boot(memory_mib=512)
    assert sandbox.run_code(SETUP, timeout_s=300).error is None  # the first sklearn import is slow under TCG
    yield sandbox
    sandbox.close()


def test_freeze_then_resume_keeps_process_state(engine, source, run_dir):
    expected = source.run_code(CHECK).text
    engine.freeze(source, run_dir / "snap", compress=True, networked=False)
    assert source.closed and qemu_pids_under(source.vm.dir) == []
    assert (run_dir / "snap" / "state").stat().st_size > 0
    with engine.resume(run_dir / "snap", "resumed") as again:  # only what is on disk, as after a restart
        assert again.run_code(CHECK).text == expected
        assert abs(float(again.run_code("import time; time.time()").text) - time.time()) < 1.0  # clock set


def test_a_mapped_freeze_resumes_and_so_does_a_format_2_stream(engine, source, run_dir):
    expected = source.run_code(CHECK).text
    engine.freeze(source, run_dir / "snap", compress=False, networked=False)
    state = run_dir / "snap" / "state"
    assert json.loads((run_dir / "snap" / META).read_text())["format"] == 3
    assert state.read_bytes()[:4] == b"QEVM" and state.stat().st_blocks * 512 < state.stat().st_size  # sparse
    with engine.resume(run_dir / "snap", "resumed") as again:
        assert again.run_code(CHECK).text == expected
        again.run_code("x += 1")
        # What the service wrote before this change: a plain stream, format 2. It still resumes (by loading).
        old = run_dir / "old"
        old.mkdir()
        with again.exclusive():
            _stream_full_state(again.vm, old / "state", compress=False)
        meta = {**json.loads((run_dir / "snap" / META).read_text()), "format": 2}
        meta.pop("hmac")
        (old / META).write_text(json.dumps({**meta, "hmac": _signature(meta, engine.secret)}))
    with engine.resume(old, "from-format-2") as older:
        assert older.run_code(CHECK).text == expected.replace("(41,", "(42,")


def resign(engine, directory, **changes) -> None:
    """Change a snapshot's metadata as this deployment would have written it (validly signed)."""
    meta = json.loads((directory / META).read_text())
    meta.pop("hmac")
    meta.update(changes)
    (directory / META).write_text(json.dumps({**meta, "hmac": _signature(meta, engine.secret)}))


def test_what_this_host_cannot_restore_or_did_not_write_is_refused_and_runs_nothing(engine, source, run_dir):
    engine.freeze(source, run_dir / "snap", compress=False, networked=False)
    before = sorted(engine.config.sandboxes_dir.glob("vm-*"))
    resign(engine, run_dir / "snap", image_id="0123456789abcdef")
    with pytest.raises(SnapshotMismatch, match="guest image"):
        engine.resume(run_dir / "snap", "other-image")
    resign(engine, run_dir / "snap", image_id=engine.image.image_id, qemu_release="1.0")
    with pytest.raises(SnapshotMismatch, match=r"QEMU release '1\.0'"):
        engine.resume(run_dir / "snap", "other-qemu")
    resign(engine, run_dir / "snap", qemu_release=json.loads((run_dir / "snap" / META).read_text())["qemu_release"])
    meta = json.loads((run_dir / "snap" / META).read_text())
    marker = run_dir / "ran"
    meta["qemu_binary"] = f"/bin/sh -c 'touch {marker}'"  # what a tampered file asks for: never read
    meta["memory_mib"] = 256
    (run_dir / "snap" / META).write_text(json.dumps(meta))
    with pytest.raises(SnapshotTampered, match="fails authentication"):
        engine.resume(run_dir / "snap", "tampered")
    assert sorted(engine.config.sandboxes_dir.glob("vm-*")) == before and not marker.exists()


def test_failed_freeze_leaves_the_sandbox_running_and_no_snapshot(engine, source, run_dir):
    def crash():
        raise RuntimeError("injected failure after the state was written")

    with pytest.raises(RuntimeError, match="injected"):
        freeze(source, run_dir / "snap", engine.image.image_id, engine.secret, fail_after_stream=crash)
    assert not (run_dir / "snap").exists() and not (run_dir / "snap.partial").exists()
    assert source.run_code("x").text == "41"


def test_fork_copies_state_and_clones_diverge(engine, source, run_dir):
    expected = source.run_code(CHECK).text
    template, clones = fork(source, 2, run_dir / "templates", run_dir, LIMITS, launcher=engine.launcher)
    memory = template.directory / "memory"
    allocated, digest = memory.stat().st_blocks, file_digest(memory)
    assert allocated * 512 < memory.stat().st_size  # sparse: the RAM in use, not the guest's size
    try:
        for clone in clones:
            assert clone.run_code(CHECK).text == expected
        clones[0].run_code("x += 1; open('/data/notes.txt', 'w').write('changed in clone 0')")
        assert clones[0].run_code("scratch = np.ones(64 << 17); int(scratch.sum())").text == str(64 << 17)
        assert clones[1].run_code(CHECK).text == expected
        assert source.run_code(CHECK).text == expected
        draws = {sb.run_code("(random.random(), float(np.random.rand()))").text for sb in (source, *clones)}
        assert len(draws) == 3
        grand_template, grandkids = fork(clones[0], 2, run_dir / "templates", run_dir, LIMITS, launcher=engine.launcher)
        try:
            assert {g.run_code("x").text for g in grandkids} == {"42"}
            # Forking a copy read all of its memory; the file it maps is neither changed nor left faulted in.
            assert file_digest(memory) == digest and memory.stat().st_blocks <= allocated
        finally:
            for g in grandkids:
                g.close()
            grand_template.remove()
    finally:
        for clone in clones:
            clone.close()
        template.remove()
    assert not any((run_dir / "templates").glob("tpl-*"))
