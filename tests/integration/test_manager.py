"""The service core without HTTP: pool hand-out, fork, freeze/resume across a restart, limits, no leaks."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace

import pytest

from service.errors import InsufficientStorage, Invalid, LimitReached, NotFound, SnapshotInvalid
from service.manager import SandboxManager
from service.pool import PoolKeeper
from service.registry import FROZEN, POOLED, RUNNING
from tests.configs import service_config as make_service_config
from tests.vmtools import kill_qemus_under, qemu_pids_under

pytestmark = pytest.mark.integration
OWNER, OTHER = "owner-hash", "other-hash"


@pytest.fixture(scope="module")
def service_config(spec, image_dir, run_root, tmp_path_factory):
    return make_service_config(
        image_dir, guest={"memory_mib": 512},
        paths={"run_dir": run_root / "svc", "state_dir": tmp_path_factory.mktemp("state")},
        service={"pool_size": 1, "warm_code": "import random, numpy as np", "max_sandboxes_per_key": 6,
                 "max_sandboxes": 8, "workers": 1},
    )


@pytest.fixture(scope="module")
def keeper(service_config):
    keeper = PoolKeeper(service_config)
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    manager = SandboxManager(service_config)
    deadline = __import__("time").monotonic() + 300
    while manager.readiness() is not None or not manager.registry.count(states=(POOLED,)):
        assert thread.is_alive(), "the pool keeper died"
        assert __import__("time").monotonic() < deadline, "no warm template within 300 s"
        thread.join(0.5)
    yield keeper
    keeper.stop()
    thread.join(60)


@pytest.fixture
def manager(service_config, keeper):
    manager = SandboxManager(service_config)
    yield manager
    for record in manager.registry.list(owner=OWNER) + manager.registry.list(owner=OTHER):
        manager._destroy(record)
    manager.close()


def test_create_is_a_hand_out_from_the_pool_and_keys_are_isolated(manager):
    pooled = {r.id for r in manager.registry.list(state=POOLED)}
    record = manager.create(OWNER)
    assert record.id in pooled and record.state == RUNNING
    assert manager.exec(OWNER, record.id, "int(np.arange(3).sum())").text == "3"
    with pytest.raises(NotFound):
        manager.exec(OTHER, record.id, "1")
    assert [r.id for r in manager.list(OTHER)] == []


def test_fork_copies_state_and_its_template_goes_with_the_last_clone(manager, service_config):
    source = manager.create(OWNER)
    manager.exec(OWNER, source.id, "x = 41")
    kids = manager.fork(OWNER, source.id, 2)
    assert len(kids) == 2 and {k.metadata["forked_from"] for k in kids} == {source.id}
    for i, kid in enumerate(kids):
        manager.exec(OWNER, kid.id, f"x += {i + 1}")
    assert [manager.exec(OWNER, k.id, "x").text for k in kids] == ["42", "43"]
    assert manager.exec(OWNER, source.id, "x").text == "41"
    draws = {manager.exec(OWNER, sid, "random.random()").text for sid in (source.id, *[k.id for k in kids])}
    assert len(draws) == 3
    template_dir = service_config.templates_dir / kids[0].template_id
    assert (template_dir / "memory").exists()
    for kid in kids:
        manager.delete(OWNER, kid.id)
    assert not template_dir.exists()  # removed with its last clone: no leaked memory file


def test_fork_over_the_limit_is_refused_up_front(manager):
    source = manager.create(OWNER)
    with pytest.raises(LimitReached, match="max_sandboxes_per_key"):
        manager.fork(OWNER, source.id, 6)
    with pytest.raises(Invalid):
        manager.fork(OWNER, source.id, 0)
    assert manager.exec(OWNER, source.id, "1 + 1").text == "2"


def test_freeze_survives_a_restart_with_tmpfs_cleared(manager, service_config):
    record = manager.create(OWNER, persistent=True)
    manager.exec(OWNER, record.id, "import numpy as np; state = np.arange(5) * 7")
    frozen = manager.freeze(OWNER, record.id)
    assert frozen.state == FROZEN
    assert qemu_pids_under(service_config.sandboxes_dir / f"vm-{record.id}") == []
    # "reboot": every VM gone, tmpfs emptied, a new manager from what is on disk
    manager.close()
    kill_qemus_under(service_config.sandboxes_dir)
    shutil.rmtree(service_config.sandboxes_dir, ignore_errors=True)
    fresh = SandboxManager(service_config)
    try:
        assert fresh.get(OWNER, record.id).state == FROZEN
        assert fresh.exec(OWNER, record.id, "state.tolist()").text == "[0, 7, 14, 21, 28]"  # resumes on use
        assert fresh.get(OWNER, record.id).state == RUNNING
        assert not fresh.snapshot_dir(record.id).exists()
    finally:
        fresh.close()


def test_an_altered_snapshot_is_refused_and_stays_frozen(manager):
    record = manager.create(OWNER)
    manager.freeze(OWNER, record.id)
    meta_file = manager.snapshot_dir(record.id) / "snapshot.json"
    meta = json.loads(meta_file.read_text())
    meta["image_id"] = "feedfacefeedface"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SnapshotInvalid, match="fails authentication"):
        manager.resume(OWNER, record.id)
    assert manager.get(OWNER, record.id).state == FROZEN


def test_frozen_quota_is_enforced(manager, service_config):
    record = manager.create(OWNER)
    tight = SandboxManager(replace(service_config, frozen_quota_bytes=64 << 20))
    try:
        with pytest.raises(InsufficientStorage, match="quota"):
            tight.freeze(OWNER, record.id)
        assert tight.exec(OWNER, record.id, "'still running'").text == "'still running'"
    finally:
        tight.close()


def test_files_stream_in_and_out_and_code_sees_them(manager):
    import hashlib
    import os

    from service.errors import NotFound as Missing

    record = manager.create(OWNER)
    blob = os.urandom(3 * 1024 * 1024 + 123)  # several frames, not a multiple of the frame size
    pieces = (blob[i : i + 50_000] for i in range(0, len(blob), 50_000))
    written = manager.write_file(OWNER, record.id, "in/blob.bin", pieces)
    assert written == {"path": "in/blob.bin", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert manager.exec(OWNER, record.id, "import os; os.path.getsize('/data/in/blob.bin')").text == str(len(blob))
    size, chunks = manager.read_file(OWNER, record.id, "/data/in/blob.bin")
    assert size == len(blob) and b"".join(chunks) == blob
    names = [(e["name"], e["type"]) for e in manager.list_dir(OWNER, record.id, "/data")["entries"]]
    assert ("in", "dir") in names
    with pytest.raises(Missing):
        manager.read_file(OWNER, record.id, "/data/nope.txt")
    manager.write_file(OWNER, record.id, "empty.txt", iter(()))
    assert manager.read_file(OWNER, record.id, "empty.txt")[0] == 0


MANY = 50_000
# Hard links to one file, one syscall each, as the sandbox user in its /data: the guest's tmpfs counts every name
# against nr_inodes (about 60k for this guest's memory), so this is about the most one directory holds here.
MAKE_MANY = f"""
import os
os.makedirs("/data/many")
fd = os.open("/data/many", os.O_RDONLY | os.O_DIRECTORY)
os.close(os.open("f000000", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
link = os.link
for i in range(1, {MANY}):
    link("f000000", f"f{{i:06d}}", src_dir_fd=fd, dst_dir_fd=fd)
os.close(fd)
len(os.listdir("/data/many"))
"""


def test_a_directory_of_50k_entries_is_listed_in_bounded_pages(manager):
    """A guest's huge directory never comes back as one reply (it was 37 MiB for 230k entries): pages of at
    most `limit` entries, in name order, with a cursor, until `more` is false."""
    record = manager.create(OWNER)
    made = manager.exec(OWNER, record.id, MAKE_MANY, timeout_s=600)
    assert made.error is None and made.text == str(MANY), (made.error, made.text)
    names: list[str] = []
    cursor, biggest = None, 0
    for _ in range(MANY // 5_000 + 2):  # a cursor that did not advance would loop: bounded
        page = manager.list_dir(OWNER, record.id, "/data/many", 5_000, cursor)
        assert len(page["entries"]) <= 5_000
        biggest = max(biggest, len(json.dumps(page)))
        names += [entry["name"] for entry in page["entries"]]
        if not page["more"]:
            break
        cursor = page["cursor"]
    assert names == [f"f{i:06d}" for i in range(MANY)]  # every entry once, in order
    # about 0.53 MB per page of 5000 here (each entry carries its path since the files API), against one reply of
    # tens of MiB for all of them
    assert biggest < 1 << 20
    first = manager.list_dir(OWNER, record.id, "/data/many")  # the default page
    assert len(first["entries"]) == 1000 and first["more"] and first["cursor"] == "f000999"
    manager.delete(OWNER, record.id)
