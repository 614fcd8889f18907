"""Snapshot compatibility follows QEMU's migration compatibility, on a real microVM with this machine's QEMU (>= 10):
what a freeze records is what this QEMU says it is; a snapshot recorded by another package of the same release
(a security update) resumes with its state; one from another minor release or machine type is refused and starts
nothing. One boot, one freeze, one resume.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from service.engine import SnapshotMismatch
from service.engine.machine import MACHINE_TYPE
from service.engine.snapshot import META, _signature

pytestmark = pytest.mark.integration
QEMU = "qemu-system-x86_64"  # the machine's own, asked directly: not through the code under test


def this_qemu() -> tuple[str, str]:
    """(major.minor, the rest of the version line) as `qemu-system-x86_64 --version` says: read here, not through
    the code under test."""
    line = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version ((\d+)\.(\d+)\S*.*)", line)
    assert match, line
    return f"{match[2]}.{match[3]}", match[1].strip()


def resign(engine, directory, **changes) -> None:
    """Change a snapshot's metadata as this deployment would have written it: signed with the engine's secret."""
    meta = json.loads((directory / META).read_text())
    meta.pop("hmac")
    meta.update(changes)
    (directory / META).write_text(json.dumps({**meta, "hmac": _signature(meta, engine.secret)}))


def other_release(release: str) -> str:
    major, minor = map(int, release.split("."))
    return f"{major}.{minor + 1}"


def test_a_qemu_package_update_keeps_snapshots_and_another_release_or_machine_is_refused(engine, run_dir):
    release, version = this_qemu()
    assert int(release.split(".")[0]) >= 10, f"QEMU {version}: the supported release is 10 or newer (make setup)"
    with engine.boot(memory_mib=256) as source:
        assert source.run_code("x = 41\nopen('/data/kept.txt', 'w').write('before the update')").error is None
        engine.freeze(source, run_dir / "snap", compress=False, networked=False)
    recorded = json.loads((run_dir / "snap" / META).read_text())
    # the machine type as this QEMU resolves it: `-machine help` lists microvm without a versioned type or alias
    help_line = next(line for line in subprocess.run([QEMU, "-machine", "help"], capture_output=True,
                                                     text=True, check=True).stdout.splitlines()
                     if line.split()[:1] == [MACHINE_TYPE])
    assert "alias of" not in help_line
    assert (recorded["qemu_release"], recorded["qemu_version"], recorded["machine_type"]) == (
        release, version, MACHINE_TYPE)
    before = sorted(engine.config.sandboxes_dir.glob("vm-*"))

    newer = other_release(release)
    resign(engine, run_dir / "snap", qemu_release=newer, qemu_version=f"{newer}.0 (Debian 1:{newer}.0+ds-1)")
    with pytest.raises(SnapshotMismatch) as refused:
        engine.resume(run_dir / "snap", "other-minor")
    assert f"QEMU release '{newer}' (QEMU {newer}.0 (Debian 1:{newer}.0+ds-1))" in str(refused.value)
    assert f"this host has '{release}' (QEMU {version})" in str(refused.value)

    resign(engine, run_dir / "snap", qemu_release=release, machine_type=f"pc-q35-{release}")
    with pytest.raises(SnapshotMismatch, match=rf"machine type 'pc-q35-{re.escape(release)}'.*'{MACHINE_TYPE}'"):
        engine.resume(run_dir / "snap", "other-machine")
    assert sorted(engine.config.sandboxes_dir.glob("vm-*")) == before  # refused before anything started

    # the same state, as if frozen before a package update of this release (e.g. 10.0.2 -> 10.0.3): it resumes
    earlier = f"{release}.0 (Debian 1:{release}.0+ds-1~bpo12+1)"
    assert earlier != version
    resign(engine, run_dir / "snap", machine_type=MACHINE_TYPE, qemu_version=earlier)
    with engine.resume(run_dir / "snap", "same-release") as again:
        assert again.run_code("(x, open('/data/kept.txt').read())").text == "(41, 'before the update')"
