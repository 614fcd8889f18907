"""A snapshot's metadata is data, not instructions: it is authenticated with the deployment's secret, bounded,
and contributes only the machine's size; what this host cannot restore is refused with the reason. No VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.engine import deployment_secret, qemu_probe
from service.engine.machine import MachineConfig
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
PACKAGE = "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
MACHINE = "microvm"


@pytest.fixture(autouse=True)
def this_qemu(monkeypatch):
    """This host's QEMU (release, package version, resolved machine type), without running a QEMU."""
    qemu_release.cache_clear()
    monkeypatch.setattr("service.engine.snapshot.qemu_release", lambda binary="": RELEASE)
    monkeypatch.setattr("service.engine.snapshot.qemu_version", lambda binary="": PACKAGE)
    monkeypatch.setattr("service.engine.snapshot.machine_type", lambda binary="": MACHINE)


def meta(**changes) -> dict:
    return {"format": SNAPSHOT_FORMAT, "qemu_release": RELEASE, "qemu_version": PACKAGE, "machine_type": MACHINE,
            "accelerator": "tcg", "image_id": "img-1", "vcpus": 1, "memory_mib": 512, "agent_ports": 4, "nic": True,
            "compressed": False, "created_at": 1.0} | changes


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
    # another minor (or major): refused naming both, the release and each side's QEMU package
    ({"qemu_release": "9.2", "qemu_version": "9.2.1 (Debian 1:9.2.1+ds-1)"},
     r"QEMU release '9\.2' \(QEMU 9\.2\.1 \(Debian 1:9\.2\.1\+ds-1\)\); this host has '10\.0' \(QEMU 10\.0\.2 "),
    ({"qemu_release": "7.2"}, r"QEMU release '7\.2'.*this host has '10\.0'"),
    ({"qemu_release": "10.1"}, r"QEMU release '10\.1'.*this host has '10\.0'"),
    ({"machine_type": "pc-q35-10.0"}, r"machine type 'pc-q35-10\.0'.*this host has 'microvm'"),
    ({"image_id": "img-0"}, "guest image 'img-0'"),
    ({"accelerator": "kvm"}, "accelerator 'kvm'"),
    ({"format": 1}, "format"),
])
def test_what_this_host_cannot_restore_is_refused_with_the_reason(tmp_path, change, words):
    snapshot = Snapshot.load(write(tmp_path / "s", meta() | change), KEY)
    with pytest.raises(SnapshotMismatch, match=words):
        snapshot.check_restorable(machine(), "img-1")


@pytest.mark.parametrize("package", ["10.0.0 (Debian 1:10.0.0+ds-1~bpo12+1)", "10.0.7 (Debian 1:10.0.7+ds-2+deb13u4)",
                                     None])
def test_a_package_update_within_the_release_keeps_snapshots(tmp_path, package):
    """Snapshots record the package's version but are compared by release: 10.0.2 -> 10.0.7 (or a snapshot from
    before qemu_version was recorded) resumes."""
    recorded = meta(qemu_version=package) if package else {k: v for k, v in meta().items() if k != "qemu_version"}
    Snapshot.load(write(tmp_path / "s", recorded), KEY).check_restorable(machine(), "img-1")


@pytest.mark.parametrize(("output", "release", "full"), [
    ("QEMU emulator version 10.0.3 (Debian 1:10.0.3+ds-1~bpo12+1)\nCopyright (c) 2003-2025\n", "10.0",
     "10.0.3 (Debian 1:10.0.3+ds-1~bpo12+1)"),
    ("QEMU emulator version 7.2.19\n", "7.2", "7.2.19"),
    ("QEMU emulator version 10.1.0 (v10.1.0-dirty)\n", "10.1", "10.1.0 (v10.1.0-dirty)"),
])
def test_qemu_version_is_read_as_release_and_package(output, release, full):
    version = qemu_probe.parse_version(output)
    assert (version.release, version.full) == (release, full)


def test_a_version_line_that_is_not_qemus_is_an_error():
    with pytest.raises(qemu_probe.QemuProbeError, match="cannot tell"):
        qemu_probe.parse_version("bash: qemu: command not found\n")


MACHINE_HELP = """Supported machines are:
microvm              microvm (i386)
pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)
pc-q35-10.0          Standard PC (Q35 + ICH9, 2009) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)
x-remote             Experimental remote machine
"""


def test_the_machine_type_recorded_is_the_versioned_one_an_alias_resolves_to():
    assert qemu_probe.resolve_machine(MACHINE_HELP, "q35") == "pc-q35-10.0"
    assert qemu_probe.resolve_machine(MACHINE_HELP, "pc") == "pc-i440fx-10.0"
    assert qemu_probe.resolve_machine(MACHINE_HELP, "pc-q35-10.0") == "pc-q35-10.0"
    assert qemu_probe.resolve_machine(MACHINE_HELP, "microvm") == "microvm"  # unversioned: the release pins it
    with pytest.raises(qemu_probe.QemuProbeError, match="no machine type 'virt'"):
        qemu_probe.resolve_machine(MACHINE_HELP, "virt")


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


# --- through the API: the real rule behind the engine's resume, the real error mapping ----------------------------


@pytest.mark.parametrize(("change", "words"), [
    ({"qemu_release": "10.1", "qemu_version": "10.1.0 (Debian 1:10.1.0+ds-1)"},
     [r"QEMU release '10.1' (QEMU 10.1.0 (Debian 1:10.1.0+ds-1))", f"this host has '10.0' (QEMU {PACKAGE})"]),
    ({"machine_type": "pc-q35-10.0"}, ["machine type 'pc-q35-10.0'", "this host has 'microvm'"]),
])
def test_resuming_an_incompatible_snapshot_is_422_naming_both_sides(client, manager, engine, monkeypatch, change,
                                                                    words):
    from tests.unit.api_helpers import A, assert_error
    from tests.unit.fakes import states

    sandbox_id = client.simulate_post("/v1/sandboxes", headers=A).json["id"]
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/freeze", headers=A).status_code == 200
    directory = manager.snapshot_dir(sandbox_id)
    content = meta() | change
    (directory / META).write_text(json.dumps({**content, "hmac": _signature(content, KEY)}))
    fake_resume = engine.resume

    def resume(directory: Path, vm_id: str):
        Snapshot.load(directory, KEY).check_restorable(machine(), "img-1")  # what Engine.resume does first
        return fake_resume(directory, vm_id)

    monkeypatch.setattr(engine, "resume", resume)
    error = assert_error(client.simulate_post(f"/v1/sandboxes/{sandbox_id}/resume", headers=A), 422,
                         "snapshot_incompatible")
    for word in words:
        assert word in error["message"]
    assert states(manager)[sandbox_id] == "frozen"
    # the same snapshot, recorded by another package of this release, resumes
    content = meta(qemu_version="10.0.0 (Debian 1:10.0.0+ds-1~bpo12+1)")
    (directory / META).write_text(json.dumps({**content, "hmac": _signature(content, KEY)}))
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/resume", headers=A).status_code == 200
    assert states(manager)[sandbox_id] == "running"
