"""The launcher's request checks (pure): what an unprivileged client may and may not have a root daemon do."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine import LauncherError
from service.engine.launch_checks import LauncherScope, check_start, check_vm_dir
from service.engine.machine import MachineConfig, machine_to_json


@pytest.fixture
def scope(tmp_path: Path) -> LauncherScope:
    (tmp_path / "images/guest-1").mkdir(parents=True)
    (tmp_path / "run/sandboxes").mkdir(parents=True)
    return LauncherScope(run_root=tmp_path / "run", image_roots=(tmp_path / "images",))


def machine(scope: LauncherScope, **changes) -> dict:
    image = scope.image_roots[0] / "guest-1"
    base = MachineConfig(kernel=image / "vmlinuz", initrd=image / "initrd.img", rootfs=image / "rootfs.ext4",
                         accelerator="tcg")
    return machine_to_json(base) | changes


def test_a_good_request_passes_and_qemu_is_always_the_systems(scope):
    request = {"machine": machine(scope, qemu_binary="/tmp/evil"), "run_dir": str(scope.run_root / "sandboxes"),
               "incoming": "defer", "vm_id": "sb-0123abcd"}
    config, run_dir, incoming, vm_id = check_start(request, scope)
    assert config.qemu_binary == "qemu-system-x86_64" and run_dir.name == "sandboxes"
    assert (incoming, vm_id) == ("defer", "sb-0123abcd")


@pytest.mark.parametrize(("changes", "request_changes", "words"), [
    ({"rootfs": "/etc/shadow"}, {}, "outside the image directories"),
    ({"kernel": "IMAGES/../../secret"}, {}, "outside the image directories"),
    ({"memory_file": "/etc/passwd"}, {}, "memory file"),
    ({}, {"run_dir": "/tmp"}, "run root"),
    ({}, {"run_dir": "RUN/../.."}, "run root"),
    ({}, {"incoming": "exec:sh"}, "incoming"),
    ({}, {"vm_id": "../../etc"}, "vm_id"),
    ({"accelerator": "xen"}, {}, "malformed"),
])
def test_requests_outside_the_scope_are_refused(scope, changes, request_changes, words):
    images, run = str(scope.image_roots[0]), str(scope.run_root)
    fixed = {k: v.replace("IMAGES", images) for k, v in changes.items()}
    request = {"machine": machine(scope, **fixed), "run_dir": run + "/sandboxes"}
    request |= {k: v.replace("RUN", run) for k, v in request_changes.items()}
    with pytest.raises(LauncherError, match=words):
        check_start(request, scope)


def test_a_symlink_cannot_smuggle_a_path_in(scope, tmp_path):
    (scope.image_roots[0] / "guest-1" / "rootfs.ext4").symlink_to("/etc/shadow")
    with pytest.raises(LauncherError, match="outside the image directories"):
        check_start({"machine": machine(scope), "run_dir": str(scope.run_root / "sandboxes")}, scope)


def test_only_vm_directories_under_the_run_root_can_be_stopped(scope):
    vm_dir = scope.run_root / "sandboxes" / "vm-sb-1"
    vm_dir.mkdir()
    assert check_vm_dir(str(vm_dir), scope) == vm_dir
    for bad in ("/etc", str(scope.run_root / "sandboxes"), str(scope.run_root / "../vm-x"), 5):
        with pytest.raises(LauncherError):
            check_vm_dir(bad, scope)
