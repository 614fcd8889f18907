"""A snapshot's metadata is data, not instructions: it is authenticated with the deployment's secret, bounded,
and contributes only the machine's size; what this host cannot restore is refused with the reason. No VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.engine import deployment_secret
from service.engine.machine import MACHINE_TYPE, MachineConfig
from service.engine.snapshot import (
    META,
    SNAPSHOT_FORMAT,
    STATE,
    Snapshot,
    SnapshotMismatch,
    SnapshotTampered,
    _signature,
    qemu_release,
)

KEY = b"k" * 32
RELEASE = "10.0"


@pytest.fixture(autouse=True)
def this_qemu(monkeypatch):
    """This host's QEMU release, without running a QEMU."""
    qemu_release.cache_clear()
    monkeypatch.setattr("service.engine.snapshot.qemu_release", lambda binary="": RELEASE)


def meta(**changes) -> dict:
    return {"format": SNAPSHOT_FORMAT, "qemu_release": RELEASE, "machine_type": MACHINE_TYPE, "accelerator": "tcg",
            "image_id": "img-1", "vcpus": 1, "memory_mib": 512, "agent_ports": 4, "nic": True, "compressed": False,
            "created_at": 1.0} | changes


def write(directory: Path, content: dict, key: bytes = KEY, signed: dict | None = None) -> Path:
    """A snapshot directory whose metadata is `content`, signed as `signed` (default: as it is)."""
    directory.mkdir()
    (directory / STATE).write_bytes(b"state")
    (directory / META).write_text(json.dumps({**content, "hmac": _signature(signed or content, key)}))
    return directory


def machine(**changes) -> MachineConfig:
    values = {"kernel": Path("/k"), "initrd": Path("/i"), "rootfs": Path("/r"), "accelerator": "tcg"} | changes
    return MachineConfig(**values)


def test_a_snapshot_this_deployment_wrote_loads_and_gives_only_its_size(tmp_path):
    snapshot = Snapshot.load(write(tmp_path / "s", meta()), KEY)
    assert snapshot.shape() == {"vcpus": 1, "memory_mib": 512, "agent_ports": 4, "nic": True}
    snapshot.check_restorable(machine(), "img-1")


@pytest.mark.parametrize("change", [
    {"qemu_binary": "/tmp/evil"},  # a program of the attacker's choosing: not even a field, and not signed
    {"memory_mib": 1024},
    {"image_id": "img-2"},
    {"kernel_args": "init=/bin/sh"},
])
def test_any_change_to_signed_metadata_is_refused(tmp_path, change):
    directory = write(tmp_path / "s", meta() | change, signed=meta())
    with pytest.raises(SnapshotTampered, match="fails authentication"):
        Snapshot.load(directory, KEY)


def test_a_snapshot_from_another_deployment_is_refused(tmp_path):
    with pytest.raises(SnapshotTampered, match="another deployment"):
        Snapshot.load(write(tmp_path / "s", meta(), key=b"o" * 32), KEY)


@pytest.mark.parametrize("text", ["[]", "{}", "not json", '{"hmac": 7}', "{" + " " * (70 << 10) + "}"])
def test_malformed_or_huge_metadata_is_refused(tmp_path, text):
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / STATE).write_bytes(b"state")
    (directory / META).write_text(text)
    with pytest.raises(SnapshotTampered):
        Snapshot.load(directory, KEY)


@pytest.mark.parametrize("change", [{"memory_mib": 1 << 30}, {"vcpus": 0}, {"agent_ports": "4"}, {"nic": 1},
                                    {"compressed": "yes"}])
def test_even_signed_metadata_stays_within_bounds(tmp_path, change):
    with pytest.raises(SnapshotTampered, match=r"bounds|booleans"):
        Snapshot.load(write(tmp_path / "s", meta() | change), KEY)


def test_a_state_file_that_is_a_link_is_refused(tmp_path):
    directory = write(tmp_path / "s", meta())
    (directory / STATE).unlink()
    os.symlink("/etc/shadow", directory / STATE)
    with pytest.raises(SnapshotTampered, match="not one this service wrote"):
        Snapshot.load(directory, KEY)


@pytest.mark.parametrize(("change", "words"), [
    ({"qemu_release": "7.2"}, "QEMU release '7.2'; this host has '10.0'"),
    ({"machine_type": "q35"}, "machine type"),
    ({"image_id": "img-0"}, "guest image"),
    ({"accelerator": "kvm"}, "accelerator"),
    ({"format": 1}, "format"),
])
def test_what_this_host_cannot_restore_is_refused_with_the_reason(tmp_path, change, words):
    snapshot = Snapshot.load(write(tmp_path / "s", meta() | change), KEY)
    with pytest.raises(SnapshotMismatch, match=words):
        snapshot.check_restorable(machine(), "img-1")


def test_a_package_update_within_the_release_keeps_snapshots(tmp_path, monkeypatch):
    snapshot = Snapshot.load(write(tmp_path / "s", meta()), KEY)
    monkeypatch.setattr("service.engine.snapshot.qemu_release", lambda binary="": "10.0")  # e.g. 10.0.2 → 10.0.3
    snapshot.check_restorable(machine(), "img-1")


def test_qemu_release_is_major_minor(monkeypatch):
    qemu_release.cache_clear()
    monkeypatch.undo()

    class Done:
        stdout = "QEMU emulator version 10.0.3 (Debian 1:10.0.3+ds-1~bpo12+1)\nCopyright (c) 2003-2025\n"

    monkeypatch.setattr("service.engine.snapshot.subprocess.run", lambda *a, **k: Done())
    from service.engine import snapshot

    assert snapshot.qemu_release("qemu-system-x86_64") == "10.0"
    snapshot.qemu_release.cache_clear()


def test_the_deployment_secret_is_made_once_and_private(tmp_path):
    path = tmp_path / "state" / "deployment.secret"
    first = deployment_secret.read_or_create(path)
    assert len(first) == 32 and deployment_secret.read_or_create(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(deployment_secret.SecretError, match="0600"):
        deployment_secret.read_or_create(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(deployment_secret.SecretError, match="32 bytes"):
        deployment_secret.read_or_create(path)
