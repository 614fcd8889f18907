"""What an operator checks on a host after the kvm_host role: QEMU from the bundle, kvm group, modules, sysctls, tmpfs.

Inside systemd-nspawn, kernel modules cannot be loaded and vm.* settings are read-only (they belong to the host
kernel): for those we check the files that apply them at boot; net.* settings belong to the container's network
namespace and are checked live.
"""

import json
import os
import re
from pathlib import Path

import pytest

testinfra_hosts = ["all"]


def test_qemu_is_installed_from_the_bundle_repository(host):
    assert host.package("qemu-system-x86").is_installed
    assert host.package("qemu-utils").is_installed
    assert host.exists("qemu-system-x86_64")
    policy = host.check_output("apt-cache policy qemu-system-x86")
    assert "file:/var/lib/appliance-bundle/debs ./" in policy


def test_qemu_is_at_least_10_at_the_exact_versions_the_bundle_records(host):
    manifest = json.loads((Path(os.environ["APPLIANCE_TEST_BUNDLE_DIR"]) / "manifest.json").read_text())
    for package in ("qemu-system-x86", "qemu-utils"):
        assert host.package(package).version == manifest["package_versions"][package]
    release = re.search(r"version (\d+)\.(\d+)", host.check_output("qemu-system-x86_64 --version"))
    assert release and (int(release[1]), int(release[2])) >= (10, 0)


def test_the_only_apt_source_is_the_bundle_and_there_is_no_default_route(host):
    sources = host.check_output("cat /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null || true")
    lines = [line for line in sources.splitlines() if line.strip() and not line.startswith("#")]
    assert lines == ["deb [trusted=yes] file:/var/lib/appliance-bundle/debs ./"]
    # The install above happened with no way out: the test host has no default route.
    assert host.check_output("ip route show default") == ""


def test_bundle_repository_files_are_root_owned_and_readable(host):
    repo = host.file("/var/lib/appliance-bundle/debs")
    assert repo.is_directory and repo.user == "root" and repo.mode == 0o755
    index = host.file("/var/lib/appliance-bundle/debs/Packages")
    assert index.user == "root" and index.mode == 0o644
    assert not host.file("/var/lib/appliance-bundle/debs.new").exists


def test_kvm_group_exists(host):
    assert host.group("kvm").exists


def test_kernel_modules_are_configured_for_boot(host):
    modules = host.file("/etc/modules-load.d/appliance.conf")
    assert modules.user == "root" and modules.mode == 0o644
    vendor = "kvm_amd" if "AuthenticAMD" in host.file("/proc/cpuinfo").content_string else "kvm_intel"
    assert vendor in modules.content_string.split()


def test_sysctls_are_written_and_the_live_ones_applied(host):
    conf = host.file("/etc/sysctl.d/60-appliance.conf")
    assert conf.mode == 0o644
    assert "vm.max_map_count = 262144" in conf.content_string
    assert "net.core.somaxconn = 4096" in conf.content_string
    # net.* is the container's own (its network namespace): applied now. vm.* is the host kernel's: not here.
    assert host.sysctl("net.core.somaxconn") == 4096


def test_vm_tmpfs_is_mounted_with_the_configured_options(host):
    mount = host.mount_point("/run/appliance")
    assert mount.exists and mount.filesystem == "tmpfs"
    kvm_gid = host.group("kvm").gid
    assert f"gid={kvm_gid}" in mount.options and "mode=770" in mount.options
    assert {"nosuid", "nodev", "noexec"} <= set(mount.options)
    unit = host.service("run-appliance.mount")
    assert unit.is_enabled and unit.is_running


@pytest.mark.parametrize("path", ["/etc/modules-load.d/appliance.conf", "/etc/sysctl.d/60-appliance.conf",
                                  "/etc/systemd/system/run-appliance.mount",
                                  "/etc/apt/sources.list.d/appliance-bundle.list"])
def test_managed_files_say_so(host, path):
    assert "Ansible managed" in host.file(path).content_string
