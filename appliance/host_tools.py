"""Every external program the host-side code runs, and the Debian package that provides it: the one table.

The Makefile installs from it (`python3 -m appliance.host_tools packages`), `appliance doctor` checks it, the
image builders' preflights are views of it, and tests/unit/test_host_tools.py fails when the code starts a program
that is missing here. The guest agent (image-builder/guest/agent) and the node's boot-time setup
(appliance/node_setup.py) are not host-side: their programs come from the images' own package lists.

Stdlib only and free of project imports: the Makefile runs it with the system python3 before the venv exists.

    python3 -m appliance.host_tools packages [PURPOSE...]   Debian packages (all purposes if none is named)
    python3 -m appliance.host_tools missing [PURPOSE...]    programs and files not on this machine, with packages
    python3 -m appliance.host_tools to-install [PURPOSE...] packages not installed, or older than their minimum
    python3 -m appliance.host_tools apt-sources [--check]   (root) Debian 12: enable backports for QEMU only;
                                                            prints the files it changed (--check: would change)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# What a program is needed for: key -> the words doctor and the listings use ("needed to <words>").
PURPOSES = {
    "setup": "set up the venv (make setup)",
    "sandboxes": "run sandboxes",
    "jail": "jail each sandbox's QEMU (else VMs run unjailed)",
    "networks": "give sandboxes networks",
    "snapshots": "freeze sandboxes compressed (service.compress_snapshots)",
    "guest-image": "build the guest image",
    "host-image": "build the host image",
    "bundle": "make a deploy bundle (appliance bundle)",
    "tests": "run the test suite",
    "provisioning-tests": "run the provisioning tests (systemd-nspawn test hosts)",
    "hostimage-tests": "boot the host image in its tests",
}
# Without these the host cannot do its one job; doctor fails. Everything else is a warning.
REQUIRED_PURPOSES = frozenset({"sandboxes"})


@dataclass(frozen=True)
class Program:
    name: str  # as the code runs it (looked up on PATH)
    package: str  # the Debian package that provides it
    purposes: tuple[str, ...]


@dataclass(frozen=True)
class Data:
    """A package the code needs for its files, not for a program: present when `path` (a glob) matches."""

    package: str
    path: str
    what: str
    purposes: tuple[str, ...]


PROGRAMS = (
    Program("python3", "python3", ("setup",)),
    Program("qemu-system-x86_64", "qemu-system-x86", ("sandboxes", "hostimage-tests")),
    # the jail (service/engine/jail.py): `sh` joins the cgroup, bwrap builds the namespaces, setpriv drops privileges
    Program("sh", "dash", ("jail", "guest-image", "host-image", "tests")),
    Program("bwrap", "bubblewrap", ("jail",)),
    Program("setpriv", "util-linux", ("jail", "tests")),
    Program("setsid", "util-linux", ("jail",)),
    Program("useradd", "passwd", ("jail",)),
    Program("nft", "nftables", ("networks",)),
    Program("ip", "iproute2", ("networks", "tests", "provisioning-tests")),
    Program("sysctl", "procps", ("networks",)),
    Program("zstd", "zstd", ("snapshots", "tests")),
    Program("cat", "coreutils", ("snapshots",)),
    Program("rm", "coreutils", ("tests",)),
    Program("mmdebstrap", "mmdebstrap", ("guest-image", "host-image", "provisioning-tests")),
    Program("apt-get", "apt", ("guest-image", "bundle")),
    Program("apt-cache", "apt", ("guest-image",)),
    Program("dpkg-deb", "dpkg", ("guest-image", "bundle", "tests")),
    Program("dpkg-query", "dpkg", ("setup", "guest-image", "host-image")),
    Program("dpkg", "dpkg", ("setup", "bundle")),  # --compare-versions, for MIN_VERSIONS
    Program("tar", "tar", ("guest-image",)),
    Program("mkfs.ext4", "e2fsprogs", ("guest-image", "host-image")),
    Program("unshare", "util-linux", ("guest-image", "host-image", "tests")),
    Program("mount", "mount", ("guest-image", "host-image", "provisioning-tests")),  # in the unshare'd `sh -c`
    Program("umount", "mount", ("provisioning-tests",)),
    Program("chroot", "coreutils", ("guest-image", "host-image", "provisioning-tests")),
    Program("mkfs.vfat", "dosfstools", ("host-image",)),
    Program("mcopy", "mtools", ("host-image", "hostimage-tests")),
    Program("mmd", "mtools", ("host-image",)),
    Program("sfdisk", "fdisk", ("host-image", "hostimage-tests")),
    Program("grub-mkimage", "grub-common", ("host-image",)),
    Program("qemu-img", "qemu-utils", ("host-image",)),
    Program("cp", "coreutils", ("hostimage-tests",)),
    Program("systemd-nspawn", "systemd-container", ("provisioning-tests",)),
    Program("ssh", "openssh-client", ("provisioning-tests", "hostimage-tests")),
    Program("ssh-keygen", "openssh-client", ("provisioning-tests", "hostimage-tests")),
    # the node's TLS front door (roles/node_proxy): its configuration is checked and run by the unit tests
    Program("haproxy", "haproxy", ("tests",)),
)

DATA = (
    Data("python3-venv", "/usr/lib/python3.*/ensurepip/__init__.py", "ensurepip, for the venv", ("setup",)),
    Data("ca-certificates", "/etc/ssl/certs/ca-certificates.crt", "TLS roots for pip and the mirrors", ("setup",)),
    Data("debian-archive-keyring", "/usr/share/keyrings/debian-archive-keyring.gpg",
         "Debian's archive keys, to verify the guest's kernel and packages", ("guest-image",)),
    # under appliance.build.host.disk.GRUB_DIR, and OVMF at tests/hostimage/nodevm.OVMF_CODE (the unit test checks)
    Data("grub-efi-amd64-bin", "/usr/lib/grub/x86_64-efi/linux.mod", "GRUB modules for x86_64-efi", ("host-image",)),
    Data("grub-pc-bin", "/usr/lib/grub/i386-pc/linux.mod", "GRUB modules for i386-pc", ("host-image",)),
    Data("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd", "UEFI firmware for QEMU", ("hostimage-tests",)),
)

# Programs the code runs that come from the venv (pip), not from Debian: the Makefile's `pip install -e .[dev]`.
VENV_PROGRAMS = {
    "ansible-playbook": "appliance deploy and the host image's roles (ansible-core)",
    "molecule": "the provisioning tests' scenarios",
    "gunicorn": "appliance serve",
    "appliance": "this project's own CLI",
    "python": "the E2B SDKs' own venvs (tests/e2b_sdk.py), made by the venv's python3 -m venv",
}


# QEMU 10 is the supported release: the fast paths need its mapped-ram migration, `file:` URIs and read-only
# file-backed memory, which Debian 12's QEMU 7.2 lacks. A package below its minimum is reinstalled (upgraded).
QEMU_PACKAGES = ("qemu-system-x86", "qemu-utils")
QEMU_MIN_RELEASE = (10, 0)
MIN_VERSIONS = {package: f"1:{QEMU_MIN_RELEASE[0]}.{QEMU_MIN_RELEASE[1]}" for package in QEMU_PACKAGES}
# Debian releases whose own QEMU is too old, and the suite that carries a new enough one. Debian 13 (trixie) ships
# QEMU 10 itself. Backports are pinned to what QEMU needs (apt_preferences below): nothing else is upgraded.
BACKPORTS = {"bookworm": "bookworm-backports"}
# QEMU's packages and what they need newer than bookworm has (qemu-system-x86 10.0 depends on seabios >> 1.16.3).
BACKPORTED = ("qemu-*", "seabios")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_SOURCE_DIR = "/etc/apt/sources.list.d"
APT_PREFERENCES_DIR = "/etc/apt/preferences.d"
APT_PREFERENCES_NAME = "appliance-qemu-backports.pref"


def apt_preferences(suite: str) -> str:
    """Pin `suite` to the QEMU packages (500: as the release itself, so the newer version wins) and everything
    else from it to 100 (never installed or upgraded unless asked for by name). Per apt_preferences(5) the first
    specific record (a named or glob package) that matches decides; the `*` record covers the rest."""
    return (f"# Written by appliance/host_tools.py: QEMU from {suite}, nothing else.\n"
            f"Package: {' '.join(BACKPORTED)}\nPin: release n={suite}\nPin-Priority: 500\n\n"
            f"Package: *\nPin: release n={suite}\nPin-Priority: 100\n")


def apt_source(suite: str, mirror: str = DEBIAN_MIRROR) -> str:
    """The deb822 source of `suite` (same path and name as Debian's wiki uses: <suite>.sources)."""
    return (f"# Written by appliance/host_tools.py: QEMU >= {'.'.join(map(str, QEMU_MIN_RELEASE))} for this "
            f"release (pinned in {APT_PREFERENCES_DIR}/{APT_PREFERENCES_NAME}).\n"
            f"Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\nSigned-By: {DEBIAN_KEYRING}\n")


def debian_codename(os_release: str = "/etc/os-release") -> str:
    try:
        with open(os_release) as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key == "VERSION_CODENAME":
                    return value.strip('"')
    except OSError:
        pass
    return ""


def apt_files(codename: str) -> dict[str, str]:
    """path -> content of the apt files this Debian release needs for QEMU >= the minimum (none on Debian 13)."""
    suite = BACKPORTS.get(codename)
    if suite is None:
        return {}
    return {f"{APT_SOURCE_DIR}/{suite}.sources": apt_source(suite),
            f"{APT_PREFERENCES_DIR}/{APT_PREFERENCES_NAME}": apt_preferences(suite)}


def write_apt_files(files: dict[str, str], dry_run: bool = False) -> list[str]:
    """Write the files whose content differs (so a second `make setup` changes nothing); returns those written
    (with dry_run: those that would be, so the Makefile asks for sudo only when something is to be written)."""
    changed = []
    for path, content in files.items():
        try:
            with open(path) as handle:
                if handle.read() == content:
                    continue
        except OSError:
            pass
        if dry_run:
            changed.append(path)
            continue
        partial = f"{path}.partial"
        with open(partial, "w") as handle:
            handle.write(content)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
        changed.append(path)
    return changed


def installed_version(package: str) -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True,
                            text=True)
    status, _, version = result.stdout.partition("\t")
    return version if result.returncode == 0 and status.endswith(" installed") else None


def version_at_least(version: str, minimum: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", version, "ge", minimum]).returncode == 0


def to_install(
    *purposes: str,
    installed: Callable[[str], str | None] = installed_version,
    at_least: Callable[[str, str], bool] = version_at_least,
) -> list[str]:
    """The packages of these purposes that are not installed, or older than their MIN_VERSIONS entry."""
    wanted = []
    for package in packages(*purposes):
        version = installed(package)
        if version is None or (package in MIN_VERSIONS and not at_least(version, MIN_VERSIONS[package])):
            wanted.append(package)
    return wanted


def _selected(purposes: Iterable[str]) -> set[str]:
    chosen = set(purposes) or set(PURPOSES)
    unknown = chosen - set(PURPOSES)
    if unknown:
        raise ValueError(f"unknown purpose {', '.join(sorted(unknown))}; choose from {', '.join(PURPOSES)}")
    return chosen


def programs(*purposes: str) -> dict[str, str]:
    """program -> Debian package, for the programs needed for any of these purposes (all if none is named)."""
    chosen = _selected(purposes)
    return {p.name: p.package for p in PROGRAMS if chosen.intersection(p.purposes)}


def data(*purposes: str) -> list[Data]:
    chosen = _selected(purposes)
    return [d for d in DATA if chosen.intersection(d.purposes)]


def packages(*purposes: str) -> list[str]:
    """The Debian packages to install for these purposes (all if none is named), sorted, each once."""
    return sorted({*programs(*purposes).values(), *(d.package for d in data(*purposes))})


def purpose_words(purposes: Iterable[str]) -> str:
    return ", ".join(PURPOSES[p] for p in purposes)


def install_command(package: str) -> str:
    return f"apt-get install --no-install-recommends {package}"


@dataclass(frozen=True)
class Missing:
    name: str  # the program, or the data package
    package: str
    purposes: tuple[str, ...]
    what: str = ""  # for data: which file is missing

    def line(self) -> str:
        missing = f"missing {self.what}" if self.what else "missing"
        return f"{missing}: needed to {purpose_words(self.purposes)}"


def matches(pattern: str) -> bool:
    """Whether a data entry's file is on this machine."""
    return bool(glob.glob(pattern))


def missing(
    *purposes: str,
    which: Callable[[str], str | None] = shutil.which,
    matches: Callable[[str], bool] = matches,
) -> list[Missing]:
    """What of the table this machine lacks, in the table's order."""
    chosen = _selected(purposes)
    found = [Missing(p.name, p.package, p.purposes) for p in PROGRAMS
             if chosen.intersection(p.purposes) and which(p.name) is None]
    return found + [Missing(d.package, d.package, d.purposes, f"{d.what} ({d.path})") for d in DATA
                    if chosen.intersection(d.purposes) and not matches(d.path)]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("packages", "missing", "to-install", "apt-sources"):
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    try:
        if argv[0] == "packages":
            print("\n".join(packages(*argv[1:])))
            return 0
        if argv[0] == "to-install":
            print("\n".join(to_install(*argv[1:])))
            return 0
        if argv[0] == "apt-sources":
            for path in write_apt_files(apt_files(debian_codename()), dry_run=argv[1:] == ["--check"]):
                print(path)
            return 0
        absent = missing(*argv[1:])
    except ValueError as exc:
        print(f"host_tools: {exc}", file=sys.stderr)
        return 2
    for item in absent:
        print(f"{item.name} ({item.package}): {item.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
