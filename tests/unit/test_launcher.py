"""The launcher's request checks (pure) and its file steps (engine/dirfd.py, on a real tmp filesystem): what an
unprivileged client may and may not have a root daemon do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.engine import LauncherError, dirfd
from service.engine.launch_checks import LauncherScope, check_start, check_vm_dir, check_vm_id
from service.engine.machine import MachineConfig, machine_to_json


@pytest.fixture
def scope(tmp_path: Path) -> LauncherScope:
    (tmp_path / "images/guest-1").mkdir(parents=True)
    (tmp_path / "run/templates").mkdir(parents=True)
    (tmp_path / "vms").mkdir()
    return LauncherScope(vms_dir=tmp_path / "vms", run_root=tmp_path / "run", image_roots=(tmp_path / "images",))


def machine(scope: LauncherScope, **changes) -> dict:
    image = scope.image_roots[0] / "guest-1"
    base = MachineConfig(kernel=image / "vmlinuz", initrd=image / "initrd.img", rootfs=image / "rootfs.ext4",
                         accelerator="tcg")
    return machine_to_json(base) | changes


def test_a_good_request_passes_and_qemu_is_always_the_systems(scope):
    memory = str(scope.run_root / "templates/tpl-1/memory")
    request = {"machine": machine(scope, qemu_binary="/tmp/evil", memory_file=memory), "incoming": "defer",
               "vm_id": "sb-0123abcd", "run_dir": "/etc"}  # a run_dir is ignored: the launcher picks the place
    config, incoming, vm_id = check_start(request, scope)
    assert config.qemu_binary == "qemu-system-x86_64" and str(config.memory_file) == memory
    assert (incoming, vm_id) == ("defer", "sb-0123abcd")


def test_image_paths_come_back_resolved_so_the_launcher_opens_what_it_checked(scope):
    images = scope.image_roots[0]
    (images / "current").symlink_to("guest-1")
    request = {"machine": machine(scope, rootfs=str(images / "current/rootfs.ext4"))}
    config, _, _ = check_start(request, scope)
    assert config.rootfs == Path(os.path.realpath(images)) / "guest-1/rootfs.ext4"


@pytest.mark.parametrize(("changes", "request_changes", "words"), [
    ({"rootfs": "/etc/shadow"}, {}, "outside the image directories"),
    ({"kernel": "IMAGES/../../secret"}, {}, "outside the image directories"),
    ({"kernel": "IMAGES"}, {}, "outside the image directories"),
    ({"memory_file": "/etc/passwd"}, {}, "memory file"),
    ({"memory_file": "RUN/templates/../../x"}, {}, "memory file"),
    ({"memory_file": "RUN"}, {}, "memory file"),
    ({}, {"incoming": "exec:sh"}, "incoming"),
    ({}, {"vm_id": "../../etc"}, "vm_id"),
    ({}, {"vm_id": "a" * 41}, "vm_id"),
    ({}, {"vm_id": ""}, "vm_id"),
    ({}, {"vm_id": 7}, "vm_id"),
    ({"accelerator": "xen"}, {}, "malformed"),
])
def test_requests_outside_the_scope_are_refused(scope, changes, request_changes, words):
    images, run = str(scope.image_roots[0]), str(scope.run_root)
    fixed = {k: v.replace("IMAGES", images).replace("RUN", run) for k, v in changes.items()}
    with pytest.raises(LauncherError, match=words):
        check_start({"machine": machine(scope, **fixed)} | request_changes, scope)


def test_a_symlink_cannot_smuggle_a_path_in(scope):
    (scope.image_roots[0] / "guest-1" / "rootfs.ext4").symlink_to("/etc/shadow")
    with pytest.raises(LauncherError, match="outside the image directories"):
        check_start({"machine": machine(scope)}, scope)


def test_vm_ids_are_short_plain_names():
    assert check_vm_id("sb-0123abcd") == "sb-0123abcd"
    for bad in ("A", "a/b", "a.b", "..", "a b", "a" * 41, None, ["a"]):
        with pytest.raises(LauncherError, match="vm_id"):
            check_vm_id(bad)


def test_only_the_launchers_own_vm_directories_can_be_named(scope):
    good = scope.vms_dir / "vm-sb-1"
    assert check_vm_dir(str(good), scope) == good
    for bad in ("/etc", str(scope.vms_dir), str(scope.run_root / "vm-sb-1"), str(scope.vms_dir / "vm-../x"),
                str(scope.vms_dir / "vm-sb-1/../vm-x"), str(scope.vms_dir / "x-sb-1"), str(scope.vms_dir / "vm-"), 5):
        with pytest.raises(LauncherError):
            check_vm_dir(bad, scope)


# ---- dirfd: the file steps the launcher takes as root ----------------------------------------------------------

def test_new_files_never_follow_or_reuse_a_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/qemu.pid").symlink_to(victim)
    fd = dirfd.open_dir(tmp_path / "d")
    try:
        with pytest.raises(FileExistsError):
            dirfd.write_new(fd, "qemu.pid", "1")
        dirfd.write_new(fd, "fresh", "2")
        dirfd.replace_file(fd, "qemu.pid", "3")  # removes the link itself, never its target
    finally:
        os.close(fd)
    assert victim.read_text() == "keep" and (tmp_path / "d/fresh").read_text() == "2"
    assert not (tmp_path / "d/qemu.pid").is_symlink() and (tmp_path / "d/qemu.pid").read_text() == "3"


def test_a_directory_is_made_and_owned_through_its_descriptor(tmp_path):
    parent = dirfd.open_dir(tmp_path)
    try:
        fd = dirfd.make_dir(parent, "vm-x", 0, 1234, 0o3770)
        os.close(fd)
        with pytest.raises(FileExistsError):
            dirfd.make_dir(parent, "vm-x", 0, 1234, 0o3770)
        (tmp_path / "link").symlink_to(tmp_path / "vm-x")
        with pytest.raises(OSError):
            dirfd.open_dir("link", parent)
        with pytest.raises(OSError):
            dirfd.ensure_dir(parent, "link", 0o700)
    finally:
        os.close(parent)
    info = (tmp_path / "vm-x").stat()
    assert (info.st_gid, info.st_mode & 0o7777) == (1234, 0o3770)


def test_open_beneath_follows_no_link_at_any_depth(tmp_path):
    (tmp_path / "run/templates/tpl").mkdir(parents=True)
    (tmp_path / "run/templates/tpl/memory").write_text("")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/memory").write_text("")
    os.close(dirfd.open_beneath(tmp_path / "run", tmp_path / "run/templates/tpl/memory", os.O_PATH))
    (tmp_path / "run/templates/link").symlink_to(tmp_path / "elsewhere")
    for bad in ("run/templates/link/memory", "run/templates/../elsewhere/memory", "elsewhere/memory"):
        with pytest.raises(OSError):
            dirfd.open_beneath(tmp_path / "run", tmp_path / bad, os.O_PATH)


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned files need root")
def test_images_open_only_from_a_store_that_is_roots_alone(tmp_path):
    store = tmp_path / "images"
    (store / "g").mkdir(parents=True)
    (store / "g/rootfs.ext4").write_text("disk")
    os.close(dirfd.open_root_owned(store / "g/rootfs.ext4"))
    os.chmod(store / "g", 0o775)  # the group could swap files: refused
    with pytest.raises(OSError, match="not root's alone"):
        dirfd.open_root_owned(store / "g/rootfs.ext4")
    os.chmod(store / "g", 0o755)
    os.chown(store / "g/rootfs.ext4", 1234, 1234)  # someone else's file: refused
    with pytest.raises(OSError, match="not a regular file that is root's alone"):
        dirfd.open_root_owned(store / "g/rootfs.ext4")
    os.chown(store / "g/rootfs.ext4", 0, 0)
    os.chown(store, 1234, 1234)  # someone else's directory above it: refused
    with pytest.raises(OSError, match="not root's alone"):
        dirfd.open_root_owned(store / "g/rootfs.ext4")
