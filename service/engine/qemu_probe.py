"""What a QEMU binary is, asked of the binary itself: its version and the machine type a name resolves to.

Snapshot compatibility follows QEMU's migration compatibility (snapshot.py): the release (major.minor) and the
machine type, not the distribution's package string, which a security update changes without touching the
migration format. Each answer is cached per binary: it starts a QEMU (`--version`, `-machine help`, ~20 ms).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache

from .vm import CHILD_ENV

_VERSION = re.compile(r"version (?P<major>\d+)\.(?P<minor>\d+)(?P<rest>[^\n]*)")
# `-machine help`: "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)"
_MACHINE = re.compile(r"^(?P<name>\S+)\s+.*?(?:\(alias of (?P<target>[^)\s]+)\))?\s*$")


class QemuProbeError(Exception):
    """The binary did not say what it is (not QEMU, or a format we do not know)."""


@dataclass(frozen=True)
class QemuVersion:
    release: str  # "10.0": what migration compatibility follows
    full: str  # "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)": recorded, never compared

    @property
    def release_tuple(self) -> tuple[int, int]:
        major, minor = self.release.split(".")
        return int(major), int(minor)


def parse_version(output: str) -> QemuVersion:
    match = _VERSION.search(output)
    if match is None:
        raise QemuProbeError(f"cannot tell the QEMU version from {output.splitlines()[:1]}")
    release = f"{match['major']}.{match['minor']}"
    return QemuVersion(release, f"{release}{match['rest']}".strip())


def resolve_machine(help_output: str, machine: str) -> str:
    """The machine type `machine` names: an alias ("q35") resolves to its versioned type ("pc-q35-10.0"). microvm
    has no versioned types on x86 (it promises no migration across releases), so it stays "microvm"; the release
    recorded beside it is what pins its state format."""
    for line in help_output.splitlines():
        match = _MACHINE.match(line)
        if match and match["name"] == machine:
            return match["target"] or machine
    raise QemuProbeError(f"this QEMU has no machine type {machine!r}")


def _run(binary: str, *args: str) -> str:
    try:
        return subprocess.run([binary, *args], capture_output=True, text=True, check=True, env=CHILD_ENV,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise QemuProbeError(f"cannot run {binary} {' '.join(args)}: {exc}") from None


@cache
def qemu_version(binary: str) -> QemuVersion:
    return parse_version(_run(binary, "--version"))


@cache
def machine_type(binary: str, machine: str) -> str:
    return resolve_machine(_run(binary, "-machine", "help"), machine)
