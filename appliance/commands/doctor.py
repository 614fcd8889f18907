from __future__ import annotations

import shutil
from pathlib import Path

import click

from .. import doctor_checks, host_tools
from ..spec import load_spec
from .options import spec_option
from .terminal import open_engine

_MARKS = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red")}


@click.command("doctor")
@spec_option
def doctor_command(spec_path: Path | None) -> None:
    """What this host can do: KVM or TCG, tools, QEMU >= 10, disk, guest image, the TLS proxy in front of the API.
    Exits non-zero if it cannot run sandboxes."""
    from service import settings
    from service.engine import EngineError, accel, jail, qemu_probe
    from service.engine.machine import QEMU_BINARY

    spec = load_spec(spec_path)
    jailed = settings.engine_config(spec).isolation is not None
    # With isolation.jail = 'on', a missing jail tool stops every sandbox; with 'auto' the VMs run unjailed.
    required = {*host_tools.REQUIRED_PURPOSES, *(("jail",) if spec.isolation.jail == "on" else ())}
    findings = doctor_checks.tool_findings(required=required)
    if shutil.which(QEMU_BINARY):
        try:
            version = qemu_probe.qemu_version(QEMU_BINARY)
            findings.append(doctor_checks.qemu_finding(version.release_tuple, version.full))
        except qemu_probe.QemuProbeError as exc:
            findings.append(doctor_checks.qemu_finding(None, "", str(exc)))
    findings.append(doctor_checks.disk_finding(spec.paths.images, lambda p: shutil.disk_usage(p).free))
    choice = None
    try:
        engine = open_engine(spec)
    except EngineError as exc:
        findings.append(doctor_checks.Finding("warn", "guest image", str(exc), "appliance build guest"))
    else:
        findings.append(doctor_checks.Finding("ok", "guest image", str(engine.image.directory)))
        if shutil.which("qemu-system-x86_64"):
            try:
                chosen = engine.accelerator
                choice = (chosen.name, chosen.reason)
            except accel.AcceleratorUnavailable as exc:
                fix = "set guest.accelerator = 'auto'"
                findings.append(doctor_checks.Finding("fail", "accelerator", str(exc), fix))
    jail_kvm = jail.kvm_device_jail_problem() if jailed else None
    findings += doctor_checks.accelerator_findings(accel.kvm_device_problem(), choice, jail_kvm)
    proxy_port = spec.service.proxy_port
    probe = doctor_checks.probe_proxy(proxy_port) if proxy_port is not None else None
    findings += doctor_checks.proxy_findings(spec.service.host, proxy_port, probe)
    for finding in findings:
        mark, color = _MARKS[finding.level]
        fix = f"  → {finding.fix}" if finding.fix else ""
        click.echo(f"{click.style(mark, fg=color)} {finding.subject:<20} {finding.detail}{fix}")
    if not doctor_checks.can_run_sandboxes(findings):
        raise click.ClickException("this host cannot run sandboxes (see ✗ above)")
