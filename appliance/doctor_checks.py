"""What `appliance doctor` checks. Each check returns a Finding; pure except for the probes it is handed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# tool -> Debian package that provides it
REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
}
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
}
MIN_FREE_IMAGES_GIB = 6.0


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | fail
    subject: str
    detail: str
    fix: str = ""


def tool_findings(which: Callable[[str], str | None] = shutil.which) -> list[Finding]:
    findings = []
    for tools, level in ((REQUIRED_TOOLS, "fail"), (BUILD_TOOLS, "warn")):
        for tool, package in tools.items():
            path = which(tool)
            if path:
                findings.append(Finding("ok", tool, path))
            else:
                role = "needed to run sandboxes" if level == "fail" else "needed to build images"
                findings.append(Finding(level, tool, f"missing ({role})", f"apt-get install {package}"))
    return findings


def disk_finding(path: Path, free_bytes: Callable[[Path], int]) -> Finding:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_gib = free_bytes(probe) / (1 << 30)
    if free_gib < MIN_FREE_IMAGES_GIB:
        detail = f"{free_gib:.1f} GiB free at {probe} (a guest build needs ~{MIN_FREE_IMAGES_GIB:g})"
        return Finding("warn", "disk", detail, "free space or set paths.cache_dir to a larger filesystem")
    return Finding("ok", "disk", f"{free_gib:.1f} GiB free at {probe}")


def accelerator_findings(kvm_problem: str | None, choice: tuple[str, str] | None) -> list[Finding]:
    """`choice` is (accelerator, reason) from a real probe boot, or None if no guest image exists to probe with."""
    findings = []
    if kvm_problem is None:
        findings.append(Finding("ok", "kvm device", "/dev/kvm answers the KVM API"))
    else:
        findings.append(Finding("warn", "kvm device", kvm_problem,
                                "enable VT-x/AMD-V in firmware and load kvm_intel/kvm_amd, or accept TCG"))
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
