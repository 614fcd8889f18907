"""What `appliance doctor` checks. Each check returns a Finding; pure except for the probes it is handed."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from appliance import host_tools

MIN_FREE_IMAGES_GIB = 6.0


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | fail
    subject: str
    detail: str
    fix: str = ""


def tool_findings(
    which: Callable[[str], str | None] = shutil.which,
    matches: Callable[[str], bool] = host_tools.matches,
    required: Collection[str] = host_tools.REQUIRED_PURPOSES,
) -> list[Finding]:
    """Every program (and data package) of the host-tools table: one ok line per purpose that has all it needs,
    one line per missing thing naming what it is for and its package. Missing for a `required` purpose fails."""
    absent = host_tools.missing(which=which, matches=matches)
    incomplete = {purpose for item in absent for purpose in item.purposes}
    findings = []
    for purpose in host_tools.PURPOSES:
        if purpose not in incomplete:
            names = [*host_tools.programs(purpose), *(d.package for d in host_tools.data(purpose))]
            findings.append(Finding("ok", purpose, ", ".join(names)))
    for item in absent:
        level = "fail" if set(required).intersection(item.purposes) else "warn"
        findings.append(Finding(level, item.name, item.line(), host_tools.install_command(item.package)))
    return findings


QEMU_FIX = ("make host-packages (on Debian 12 it enables bookworm-backports pinned to QEMU; Debian 13 ships QEMU 10); "
            "on a node: appliance deploy with a current bundle")


def qemu_finding(release: tuple[int, int] | None, version: str, problem: str = "") -> Finding:
    """QEMU's release against the supported minimum (host_tools.QEMU_MIN_RELEASE): older fails, since the engine
    needs mapped-ram migration, `file:` URIs and read-only file-backed memory. `release` None: not probed
    (`problem` says why; a missing binary is the tools check's finding)."""
    minimum = ".".join(map(str, host_tools.QEMU_MIN_RELEASE))
    if release is None:
        return Finding("fail", "qemu version", problem or "unknown", QEMU_FIX)
    if release < host_tools.QEMU_MIN_RELEASE:
        return Finding("fail", "qemu version", f"{version}: older than the supported {minimum}", QEMU_FIX)
    return Finding("ok", "qemu version", version)


def disk_finding(path: Path, free_bytes: Callable[[Path], int]) -> Finding:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_gib = free_bytes(probe) / (1 << 30)
    if free_gib < MIN_FREE_IMAGES_GIB:
        detail = f"{free_gib:.1f} GiB free at {probe} (a guest build needs ~{MIN_FREE_IMAGES_GIB:g})"
        return Finding("warn", "disk", detail, "free space or set paths.cache_dir to a larger filesystem")
    return Finding("ok", "disk", f"{free_gib:.1f} GiB free at {probe}")


def accelerator_findings(
    kvm_problem: str | None, choice: tuple[str, str] | None, jail_kvm_problem: str | None = None
) -> list[Finding]:
    """`choice` is (accelerator, reason) from a real probe boot, or None if no guest image exists to probe with.
    `jail_kvm_problem` is why the jailed VM user cannot open /dev/kvm (service.engine.jail.kvm_jail_problem), or
    None: the jail itself is in force then, only KVM is lost to it, and the fix is the device's group."""
    findings = []
    if kvm_problem is not None:
        findings.append(Finding("warn", "kvm device", kvm_problem,
                                "enable VT-x/AMD-V in firmware and load kvm_intel/kvm_amd, or accept TCG"))
    elif jail_kvm_problem is not None:
        from service.engine.jail import KVM_GROUP_FIX

        findings.append(Finding("warn", "kvm device", jail_kvm_problem, KVM_GROUP_FIX))
    else:
        findings.append(Finding("ok", "kvm device", "/dev/kvm answers the KVM API"))
    if choice is None:
        findings.append(Finding("warn", "accelerator", "not probed: no guest image yet", "appliance build guest"))
    elif choice[0] == "kvm":
        findings.append(Finding("ok", "accelerator", f"kvm: {choice[1]}"))
    else:
        findings.append(Finding("warn", "accelerator", f"tcg: {choice[1]}",
                                "sandboxes work, 10-30x slower for CPU-bound code"))
    return findings


def can_run_sandboxes(findings: list[Finding]) -> bool:
    return not any(finding.level == "fail" for finding in findings)
