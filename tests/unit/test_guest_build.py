"""The guest image builder's pure logic and its caching/atomicity contract (no network, no root tools)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.build import BuildError, build_guest_image
from appliance.build import guest as guest_module
from appliance.build.apt import Apt
from appliance.build.common import RECIPE_DIR, atomic_output, error_line, exclusive, parse_list, read_list, run
from appliance.build.initramfs import (
    Entry,
    char_device,
    initramfs_entries,
    newc_archive,
    regular,
    symlink,
)
from appliance.build.kernel import (
    builtin_modules,
    load_order,
    module_deps,
    module_name,
    parse_modinfo,
    parse_version,
    resolve_kernel_package,
)
from appliance.build.rootfs import (
    canonical_name,
    check_pins,
    dependency_closure,
    ext4_geometry,
    manylinux_platforms,
    mmdebstrap_args,
    packages_to_purge,
    parse_dpkg_depends,
    parse_dpkg_query,
    parse_metadata,
    parse_pins,
    pip_env,
    top_level_packages,
    tree_usage,
    wheel_target_args,
)
from appliance.progress import Progress
from appliance.spec import ApplianceSpec
from appliance.spec import image_build_dir as guest_image_dir

# --- running tools -------------------------------------------------------------------------------------------


def test_error_line_is_one_line_with_phase_tool_and_tail() -> None:
    output = "I: lots of chatter\n\nE: Unable to locate package pyhton3\nE: apt-get failed\n"
    line = error_line("rootfs: mmdebstrap", ["/usr/bin/mmdebstrap", "x"], 25, output)
    assert "\n" not in line
    assert line.startswith("rootfs: mmdebstrap: mmdebstrap exited with 25: ")
    assert line.endswith("E: Unable to locate package pyhton3 | E: apt-get failed")


def test_error_line_cuts_a_long_tail_and_says_when_there_is_no_output() -> None:
    assert len(error_line("p", ["t"], 1, "x" * 5000)) < 500
    assert error_line("p", ["t"], 1, "  \n").endswith("no error output")


def test_run_raises_build_error_with_stderr_tail() -> None:
    with pytest.raises(BuildError) as caught:
        run("kernel: fetch", ["sh", "-c", "echo chatter; echo 'E: the real problem' >&2; exit 3"])
    assert str(caught.value) == "kernel: fetch: sh exited with 3: E: the real problem"


def test_run_names_a_missing_tool() -> None:
    with pytest.raises(BuildError, match=r"^rootfs: mkfs.ext4: no-such-tool-xyz not found"):
        run("rootfs: mkfs.ext4", ["no-such-tool-xyz"])


def test_a_missing_tool_in_the_table_is_named_with_its_package(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"mmdebstrap not found \(install it: apt-get install --no-install-recommends "
                                         r"mmdebstrap\)$"):
        run("rootfs: mmdebstrap", [tmp_path / "mmdebstrap"])  # the table knows the name, whatever the directory


# --- atomic outputs and the lock ------------------------------------------------------------------------------


def test_atomic_output_appears_only_complete(tmp_path: Path) -> None:
    target = tmp_path / "out" / "stage.tar"
    with atomic_output(target) as partial:
        partial.write_text("whole")
        assert partial.parent == target.parent and partial.name.startswith(".stage.tar.partial-")
        assert not target.exists()
    assert target.read_text() == "whole"
    assert sorted(p.name for p in target.parent.iterdir()) == ["stage.tar"]


def test_atomic_output_keeps_the_old_output_and_leaves_nothing_when_the_body_fails(tmp_path: Path) -> None:
    target = tmp_path / "stage.tar"
    target.write_text("old")
    with pytest.raises(BuildError), atomic_output(target) as partial:
        partial.write_text("half")
        raise BuildError("x: y")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stage.tar"]


def test_atomic_output_replaces_a_directory_and_removes_a_dead_builds_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "image"
    target.mkdir()
    (target / "vmlinuz").write_text("old")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    leftover = tmp_path / f".image.partial-{dead}"
    leftover.mkdir()
    with atomic_output(target) as work:
        work.mkdir()
        (work / "vmlinuz").write_text("new")
    assert (target / "vmlinuz").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["image"]


def test_exclusive_without_wait_says_whether_it_holds_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "stage.lock"
    with exclusive(lock) as held:
        assert held
        # flock locks belong to the open file: a second open, even in this process, is another contender
        with exclusive(lock, wait=False) as second:
            assert not second
    with exclusive(lock, wait=False) as held:
        assert held


def test_parse_list_drops_comments_and_blanks() -> None:
    assert parse_list("# head\npython3\n\niproute2   # why\n  \n") == ["python3", "iproute2"]


# --- the private apt --------------------------------------------------------------------------------------------


def test_apt_sources_add_updates_and_security_for_a_debian_mirror() -> None:
    assert Apt.sources("http://deb.debian.org/debian/", "bookworm") == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_apt_sources_guess_no_security_archive_for_another_layout() -> None:
    lines = Apt.sources("http://mirror.example/debian-local", "bookworm")
    assert lines == [
        "deb http://mirror.example/debian-local bookworm main",
        "deb http://mirror.example/debian-local bookworm-updates main",
    ]


def test_apt_options_confine_apt_to_its_state_dir(tmp_path: Path) -> None:
    options = Apt.options(tmp_path)
    assert f"-oDir::Etc::SourceList={tmp_path / 'sources.list'}" in options
    assert f"-oDir::State::status={tmp_path / 'status'}" in options  # not the host's installed packages
    assert all(str(tmp_path) in o for o in options if o.startswith("-oDir"))


APT_CACHE_DEPENDS = """linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
  Recommends: <firmware-linux-free>
"""


def test_resolve_kernel_metapackage_from_apt_cache_depends() -> None:
    assert resolve_kernel_package("linux-image-cloud-amd64", APT_CACHE_DEPENDS) == "linux-image-6.1.0-56-cloud-amd64"


def test_resolve_kernel_package_keeps_a_real_package() -> None:
    assert resolve_kernel_package("linux-image-6.1.0-56-cloud-amd64", "") == "linux-image-6.1.0-56-cloud-amd64"


def test_resolve_kernel_package_fails_without_a_versioned_image() -> None:
    with pytest.raises(ValueError, match="no linux-image-<version>"):
        resolve_kernel_package("linux-image-cloud-amd64", "linux-image-cloud-amd64\n  Depends: libc6\n")


def test_parse_version_and_deb_filename() -> None:
    assert parse_version("Package: busybox-static\nVersion: 1:1.35.0-4+b1\nArch: amd64\n") == "1:1.35.0-4+b1"
    assert Apt.deb_filename("busybox-static", "1:1.35.0-4+b1") == "busybox-static_1%3a1.35.0-4+b1_amd64.deb"
    with pytest.raises(ValueError):
        parse_version("Package: x\n")


# --- kernel: modules ----------------------------------------------------------------------------------------


def fake_module(modinfo: dict[str, str] | list[tuple[str, str]]) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, as parse_modinfo reads it."""
    items = modinfo.items() if isinstance(modinfo, dict) else modinfo
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_size, shentsize = 64, 64
    info_off = header_size
    strtab_off = info_off + len(info)
    shoff = strtab_off + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, shentsize, 3, 2)
    null = b"\0" * shentsize
    modinfo_sh = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, info_off, len(info), 0, 0, 1, 0)
    strtab_sh = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    return header + info + shstrtab + null + modinfo_sh + strtab_sh


def test_parse_modinfo_reads_key_values() -> None:
    info = parse_modinfo(
        fake_module([("name", "virtio_blk"), ("depends", "virtio,virtio_ring"), ("alias", "a"), ("alias", "b")])
    )
    assert info["name"] == ["virtio_blk"]
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["alias"] == ["a", "b"]


def test_parse_modinfo_rejects_non_elf() -> None:
    with pytest.raises(ValueError):
        parse_modinfo(b"not an elf file at all, not at all")


def test_module_deps_include_pre_softdeps_not_post() -> None:
    info = {"depends": ["virtio,virtio-ring"], "softdep": ["pre: crc32c post: zstd"]}
    assert module_deps(info) == ["virtio", "virtio_ring", "crc32c"]
    assert module_deps({"depends": [""]}) == []


def test_module_name_treats_dash_and_underscore_alike() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("virtio_rng") == "virtio_rng"
    assert module_name("overlay.ko.xz") == "overlay"


DEPS = {
    "virtio_ring": [],
    "virtio": [],
    "virtio_mmio": ["virtio", "virtio_ring"],
    "virtio_blk": ["virtio", "virtio_ring"],
    "virtio_net": ["net_failover", "virtio", "virtio_ring"],
    "net_failover": ["failover"],
    "failover": [],
    "overlay": [],
}


def test_load_order_puts_dependencies_first_and_each_module_once() -> None:
    order = load_order(["virtio_mmio", "virtio_blk", "overlay", "virtio_net"], DEPS, builtin=set())
    assert sorted(order) == sorted(set(order))
    for name in order:
        for dep in DEPS[name]:
            assert order.index(dep) < order.index(name), f"{dep} must load before {name}"
    assert order[-1] == "virtio_net"


def test_load_order_skips_builtin_modules() -> None:
    assert load_order(["ext4", "overlay"], DEPS, builtin={"ext4"}) == ["overlay"]


def test_load_order_rejects_an_unknown_module_with_its_chain() -> None:
    with pytest.raises(ValueError, match=r"'vsock'.*neither a module nor built in"):
        load_order(["virtio_blk", "vsock"], DEPS, builtin=set())


def test_load_order_rejects_a_cycle() -> None:
    with pytest.raises(ValueError, match="cycle"):
        load_order(["a"], {"a": ["b"], "b": ["a"]}, builtin=set())


def test_builtin_modules_from_modules_builtin() -> None:
    assert builtin_modules("kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n") == {"ext4", "crc32c_generic"}


def test_recipe_module_list_has_what_the_guest_needs() -> None:
    wanted = {module_name(m) for m in read_list(RECIPE_DIR / "kernel" / "modules.txt")}
    assert {"virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng", "overlay"} <= wanted
    # The NIC driver is loaded on request only: at boot, a sandbox has no network interface.
    on_request = {module_name(m) for m in read_list(RECIPE_DIR / "kernel" / "modules-network.txt")}
    assert "virtio_net" in on_request and "virtio_net" not in wanted


# --- initramfs ----------------------------------------------------------------------------------------------


def read_newc(archive: bytes) -> list[dict[str, object]]:
    """Independent reader for the newc format, to check what the writer wrote."""
    entries, offset = [], 0
    while True:
        assert archive[offset : offset + 6] == b"070701", f"bad magic at {offset}"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return entries
        entries.append({"name": name, "mode": fields[1], "data": data, "rdev": (fields[9], fields[10])})


def test_newc_archive_round_trips_and_adds_parents_first() -> None:
    archive = newc_archive(
        [
            regular("lib/modules/6.1/virtio.ko", b"\x7fELF..."),
            symlink("bin/sh", "busybox"),
            char_device("dev/console", 5, 1),
            regular("init", b"#!/bin/sh\n", 0o755),
        ]
    )
    entries = read_newc(archive)
    names = [e["name"] for e in entries]
    for directory in ("bin", "dev", "lib", "lib/modules", "lib/modules/6.1"):
        assert directory in names
    for entry in entries:  # every parent comes before its children
        parent = str(Path(str(entry["name"])).parent)
        if parent != ".":
            assert names.index(parent) < names.index(entry["name"])
    by_name = {e["name"]: e for e in entries}
    assert by_name["bin/sh"]["data"] == b"busybox" and stat.S_ISLNK(by_name["bin/sh"]["mode"])  # type: ignore[arg-type]
    assert by_name["dev/console"]["rdev"] == (5, 1) and stat.S_ISCHR(by_name["dev/console"]["mode"])  # type: ignore[arg-type]
    assert by_name["init"]["mode"] == stat.S_IFREG | 0o755
    assert by_name["lib/modules/6.1/virtio.ko"]["data"] == b"\x7fELF..."


def test_newc_archive_is_reproducible() -> None:
    entries = [regular("b", b"2"), regular("a", b"1")]
    assert newc_archive(entries) == newc_archive(list(reversed(entries)))


def test_initramfs_lists_modules_in_load_order() -> None:
    entries = initramfs_entries(b"#!/bin/sh\n", b"BB", [("virtio.ko", b"v"), ("virtio_mmio.ko", b"m")], "6.1.0-x")
    by_path = {e.path: e for e in entries}
    assert by_path["etc/modules.load"].data == b"/lib/modules/6.1.0-x/virtio.ko\n/lib/modules/6.1.0-x/virtio_mmio.ko\n"
    assert by_path["init"].mode & 0o111
    assert by_path["dev/console"].rdev == (5, 1)  # PID 1 gets a console before devtmpfs is mounted
    assert isinstance(by_path["bin/switch_root"], Entry) and by_path["bin/switch_root"].data == b"busybox"


def test_init_scripts_parse_and_never_fall_into_a_shell_silently() -> None:
    init = RECIPE_DIR / "guest" / "initramfs" / "init"
    appliance_init = RECIPE_DIR / "guest" / "init" / "appliance-init"
    for script in (init, appliance_init):
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK)
    text = init.read_text()
    assert "poweroff -f" in text and "appliance.init=" in text and "exec switch_root" in text
    assert "python3 -m appliance_agent" in appliance_init.read_text()


# --- rootfs: wheels -----------------------------------------------------------------------------------------


def test_manylinux_platforms_cover_every_tag_the_libc_runs_newest_first() -> None:
    tags = manylinux_platforms((2, 36))
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_28_x86_64" in tags  # numpy >= 2.3 ships only these
    assert tags.index("manylinux_2_28_x86_64") < tags.index("manylinux_2_17_x86_64")
    assert "manylinux2014_x86_64" in tags and "manylinux_2_37_x86_64" not in tags


def test_wheel_target_args_pin_interpreter_and_platforms() -> None:
    args = wheel_target_args(["manylinux_2_28_x86_64", "manylinux2014_x86_64"], "3.11")
    assert args[:7] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311"]
    assert args[7:] == ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]


def test_pip_env_ignores_config_and_selection_settings_but_keeps_index_access() -> None:
    env = pip_env(
        {
            "PATH": "/bin",
            "PIP_CONSTRAINT": "/etc/c.txt",
            "PIP_FIND_LINKS": "/opt/wheels",
            "PIP_INDEX_URL": "https://mirror/simple",
            "PIP_CERT": "/ca.pem",
            "PIP_NO_DEPS": "1",
        }
    )
    assert env["PIP_CONFIG_FILE"] == os.devnull
    assert "PIP_CONSTRAINT" not in env and "PIP_FIND_LINKS" not in env and "PIP_NO_DEPS" not in env
    assert env["PIP_INDEX_URL"] == "https://mirror/simple" and env["PIP_CERT"] == "/ca.pem"
    assert env["PATH"] == "/bin"


def test_check_pins_reports_wrong_and_missing_versions_with_normalised_names() -> None:
    pins = parse_pins(["scikit-learn==1.9.1", "numpy==2.4.6", "pandas==3.1.1"])
    installed = {canonical_name("scikit_learn"): "1.9.1", "numpy": "2.2.6"}
    assert check_pins(pins, installed) == [
        "numpy 2.2.6 is installed, the spec pins 2.4.6",
        "pandas is not installed (wanted 3.1.1)",
    ]
    assert check_pins(pins, {**installed, "numpy": "2.4.6", "pandas": "3.1.1"}) == []


def test_parse_metadata_and_top_level_packages() -> None:
    assert parse_metadata("Metadata-Version: 2.1\nName: scikit-learn\nVersion: 1.9.1\n\nlong text") == (
        "scikit-learn",
        "1.9.1",
    )
    record = (
        "sklearn/__init__.py,sha256=x,1\nsklearn/base.py,,\nscikit_learn-1.9.1.dist-info/RECORD,,\n"
        "pylab.py,,\nmpl_toolkits/axes_grid1/__init__.py,,\nscikit_learn.libs/libgomp.so,,\n"
    )
    assert top_level_packages(record) == ["sklearn"]


# --- rootfs: debian -----------------------------------------------------------------------------------------


DPKG_QUERY = (
    "python3\t3.11.2-1+b1\t, python3.11 (>= 3.11.2-1~), libpython3-stdlib (= 3.11.2-1+b1)\n"
    "build-essential\t12.9\t, libc6-dev | libc-dev, gcc (>= 4:12.2), g++ (>= 4:12.2), make, dpkg-dev\n"
    "gcc\t4:12.2.0-3\t, cpp (= 4:12.2.0-3), gcc-12 (>= 12.2.0-1~)\n"
    "gcc-12\t12.2.0-14\tgcc-12-base (= 12.2.0-14), cpp-12 (= 12.2.0-14), binutils:any\n"
    "usrmerge\t35\t, perl:any, libfile-find-rule-perl\n"
)


def test_parse_dpkg_query_and_depends() -> None:
    assert parse_dpkg_query(DPKG_QUERY)["gcc-12"] == "12.2.0-14"
    depends = parse_dpkg_depends(DPKG_QUERY)
    assert depends["build-essential"] == ["libc6-dev", "libc-dev", "gcc", "g++", "make", "dpkg-dev"]
    assert depends["gcc-12"] == ["gcc-12-base", "cpp-12", "binutils"]
    assert depends["python3"] == ["python3.11", "libpython3-stdlib"]


def test_dependency_closure() -> None:
    closure = dependency_closure(["build-essential"], parse_dpkg_depends(DPKG_QUERY))
    assert {"build-essential", "gcc", "gcc-12", "cpp-12", "libc6-dev"} <= closure
    assert "usrmerge" not in closure and "perl" not in closure


def test_packages_to_purge_with_the_recipe_keeps_runtime_libraries() -> None:
    patterns = read_list(RECIPE_DIR / "guest" / "trim-packages.txt")
    installed = [
        "gcc-12",
        "gcc-12-base",
        "cpp-12",
        "libc6-dev",
        "perl",
        "perl-base",
        "libperl5.36",
        "python3",
        "libgcc-s1",
        "perl-modules-5.36",
        "usrmerge",
        "libfile-find-rule-perl",
    ]
    assert packages_to_purge(installed, patterns, keep=set()) == [
        "cpp-12",
        "gcc-12",
        "libc6-dev",
        "libfile-find-rule-perl",
        "libperl5.36",
        "perl",
        "perl-modules-5.36",
        "usrmerge",
    ]


def test_packages_the_spec_asks_for_and_their_dependencies_are_not_purged() -> None:
    patterns = read_list(RECIPE_DIR / "guest" / "trim-packages.txt")
    installed = parse_dpkg_query(DPKG_QUERY)
    keep = dependency_closure(["build-essential"], parse_dpkg_depends(DPKG_QUERY))
    assert packages_to_purge(installed, patterns, keep) == ["usrmerge"]


def test_mmdebstrap_args() -> None:
    args = mmdebstrap_args(
        "bookworm",
        ["deb http://m/debian bookworm main"],
        ["python3", "iproute2"],
        ["path-exclude=/usr/share/doc/*"],
        Path("/tmp/out.tar"),
    )
    assert args[0] == "mmdebstrap" and "--variant=minbase" in args and "--format=tar" in args
    assert "--include=python3,iproute2" in args and "--dpkgopt=path-exclude=/usr/share/doc/*" in args
    assert args[-3:] == ["bookworm", "/tmp/out.tar", "deb http://m/debian bookworm main"]


def test_ext4_geometry_fits_the_data_with_room_for_metadata() -> None:
    size, inodes = ext4_geometry(500 << 20, 40000)
    assert size > (500 << 20) + 40000 * 256
    assert size % (1 << 20) == 0
    assert inodes > 40000


def test_tree_usage_counts_blocks_and_inodes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small").write_bytes(b"x")
    (tmp_path / "big").write_bytes(b"x" * 5000)
    (tmp_path / "link").symlink_to("d/small")
    used, inodes = tree_usage(tmp_path)
    assert inodes == 5  # d, small, big, link, and the root
    assert used == 4096 + 8192 + 2 * 4096  # small, big, d and the root; a short symlink lives in its inode


# --- the driver: naming, caching, atomicity, manifest -------------------------------------------------------


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApplianceSpec:
    monkeypatch.setattr(guest_module, "preflight_problem", lambda euid, which: None)  # root and tools not needed
    return ApplianceSpec(paths={"cache_dir": tmp_path / "cache"})


def fake_build(spec: ApplianceSpec, work: Path, progress: Progress, refresh: bool) -> None:
    for name in guest_module.ARTIFACTS:
        (work / name).write_text(name)
    (work / guest_module.MANIFEST).write_text(json.dumps({"recipe_hash": guest_module.recipe_hash()}))


def test_guest_image_dir_is_named_by_the_guest_content_and_the_recipe(
    spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = guest_image_dir(spec)
    assert image.parent == spec.paths.images
    assert image.name.startswith("guest-") and len(image.name) == len("guest-") + 16
    spec.guest.memory_mib = 4096  # the VM size is not part of the image
    assert guest_image_dir(spec) == image
    spec.guest.pip_packages = ["numpy==2.4.6"]
    other_packages = guest_image_dir(spec)
    assert other_packages != image
    monkeypatch.setattr(guest_module, "recipe_hash", lambda: "a-newer-agent")
    assert guest_image_dir(spec) not in (image, other_packages)


def test_existing_image_is_returned_without_building(spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_module, "_build_into", fake_build)
    built = build_guest_image(spec)
    assert guest_module.is_complete(built)

    def must_not_build(*args: object) -> None:
        raise AssertionError("rebuilt an image that exists")

    monkeypatch.setattr(guest_module, "_build_into", must_not_build)
    assert build_guest_image(spec) == built


def test_a_newer_recipe_or_agent_builds_beside_the_old_image(
    spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_module, "_build_into", fake_build)
    built = build_guest_image(spec)
    old_kernel = (built / "vmlinuz").read_text()
    monkeypatch.setattr(guest_module, "recipe_hash", lambda: "a-newer-agent")
    rebuilt: list[Path] = []
    monkeypatch.setattr(
        guest_module, "_build_into", lambda spec, work, *_: rebuilt.append(work) or fake_build(spec, work, *_)
    )
    newer = build_guest_image(spec)
    assert newer != built and len(rebuilt) == 1
    # What running sandboxes and templates were made from is still there, untouched.
    assert guest_module.is_complete(built) and (built / "vmlinuz").read_text() == old_kernel


def test_an_image_whose_manifest_names_another_recipe_is_rebuilt(
    spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_module, "_build_into", fake_build)
    built = build_guest_image(spec)
    (built / guest_module.MANIFEST).write_text(json.dumps({"recipe_hash": "hand-edited"}))
    rebuilt: list[Path] = []
    monkeypatch.setattr(
        guest_module, "_build_into", lambda spec, work, *_: rebuilt.append(work) or fake_build(spec, work, *_)
    )
    assert build_guest_image(spec) == built
    assert len(rebuilt) == 1


def test_force_rebuilds_and_replaces_the_image(spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_module, "_build_into", fake_build)
    built = build_guest_image(spec)
    (built / "vmlinuz").write_text("old")
    assert (build_guest_image(spec, force=True) / "vmlinuz").read_text() == "vmlinuz"
    assert sorted(p.name for p in spec.paths.images.iterdir()) == [f".{built.name}.lock", built.name]


def test_an_interrupted_build_leaves_nothing_that_looks_complete(
    spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_build(spec: ApplianceSpec, work: Path, progress: Progress, refresh: bool) -> None:
        (work / "vmlinuz").write_text("partial")
        raise BuildError("rootfs: mmdebstrap: mmdebstrap exited with 1: E: network down")

    monkeypatch.setattr(guest_module, "_build_into", failing_build)
    with pytest.raises(BuildError, match="network down"):
        build_guest_image(spec)
    assert not guest_image_dir(spec).exists()
    assert [p.name for p in spec.paths.images.iterdir()] == [f".{guest_image_dir(spec).name}.lock"]


def test_a_previous_image_survives_a_failed_forced_rebuild(
    spec: ApplianceSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_module, "_build_into", fake_build)
    built = build_guest_image(spec)

    def failing_build(*args: object) -> None:
        raise BuildError("x: y")

    monkeypatch.setattr(guest_module, "_build_into", failing_build)
    with pytest.raises(BuildError):
        build_guest_image(spec, force=True)
    assert guest_module.is_complete(built)


def test_preflight_names_root_and_the_packages_of_missing_tools() -> None:
    assert "needs root" in str(guest_module.preflight_problem(1000, lambda tool: "/usr/bin/" + tool))
    assert guest_module.preflight_problem(0, lambda tool: "/usr/bin/" + tool) is None
    problem = guest_module.preflight_problem(0, lambda tool: None if tool in {"mmdebstrap", "mkfs.ext4"} else tool)
    assert problem == "build: missing host tools; install the Debian packages: e2fsprogs mmdebstrap"
    problem = guest_module.preflight_problem(0, lambda tool: None if tool == "apt-cache" else tool)
    assert problem == "build: missing host tools; install the Debian packages: apt"  # the kernel's resolution


def test_build_manifest_records_versions_digests_and_cmdline() -> None:
    manifest = guest_module.build_manifest(
        spec_hash="ab" * 32,
        guest={"suite": "bookworm"},
        recipe="cd" * 32,
        kernel={
            "package": "linux-image-6.1.0-56-cloud-amd64",
            "version": "6.1.192-2",
            "release": "6.1.0-56-cloud-amd64",
            "modules": ["virtio"],
        },
        busybox_version="1:1.35.0-4",
        debian_packages={"python3": "3.11.2-1+b1", "libc6": "2.36-9"},
        purged_packages=["perl"],
        pip_packages={"numpy": "2.4.6"},
        artifacts={"vmlinuz": {"sha256": "00", "size": 1}},
        built_at=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        build_seconds=42.04,
    )
    assert manifest["spec_hash"] == "ab" * 32
    assert list(manifest["debian_packages"]) == ["libc6", "python3"]
    assert manifest["kernel"]["version"] == "6.1.192-2"
    assert manifest["built_at"] == "2026-11-28T12:00:00+00:00"
    assert manifest["build_seconds"] == 42.0
    assert "root=/dev/vda" in manifest["kernel_cmdline"] and "console=ttyS0" in manifest["kernel_cmdline"]
    json.dumps(manifest)  # serialisable as it is


def test_file_record_hashes_by_streaming(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc" * 1_000_000)  # several read chunks
    assert guest_module.file_record(path) == {
        "sha256": hashlib.sha256(b"abc" * 1_000_000).hexdigest(),
        "size": 3_000_000,
    }
