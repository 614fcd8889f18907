import stat
from pathlib import Path

from appliance import doctor_checks, host_tools
from service.engine import jail

EVERYTHING = {"which": lambda tool: "/usr/bin/" + tool, "matches": lambda pattern: True}


def _without(*absent: str) -> dict:
    return {"which": lambda tool: None if tool in absent else "/usr/bin/" + tool, "matches": lambda pattern: True}


def test_every_program_and_data_package_of_the_table_is_checked():
    """Each program and data package shows on an ok line when present; each one alone missing gets its own line."""
    findings = doctor_checks.tool_findings(**EVERYTHING)
    assert [f.subject for f in findings] == list(host_tools.PURPOSES)  # one ok line per purpose, nothing missing
    shown = {name for f in findings for name in f.detail.split(", ")}
    for program in host_tools.programs():
        assert program in shown
        missing = [f for f in doctor_checks.tool_findings(**_without(program)) if f.level != "ok"]
        assert [f.subject for f in missing] == [program]
    for entry in host_tools.DATA:
        assert entry.package in shown
        findings = doctor_checks.tool_findings(which=EVERYTHING["which"], matches=lambda path, e=entry: path != e.path)
        assert [f.subject for f in findings if f.level != "ok"] == [entry.package]


def test_missing_qemu_fails_and_names_the_package_and_what_it_is_for():
    findings = doctor_checks.tool_findings(**_without("qemu-system-x86_64"))
    failing = [f for f in findings if f.level == "fail"]
    assert [f.subject for f in failing] == ["qemu-system-x86_64"]
    assert "run sandboxes" in failing[0].detail
    assert failing[0].fix == "apt-get install --no-install-recommends qemu-system-x86"
    assert not doctor_checks.can_run_sandboxes(findings)


def test_missing_nft_warns_that_sandboxes_get_no_network():
    findings = doctor_checks.tool_findings(**_without("nft"))
    (nft,) = [f for f in findings if f.level != "ok"]
    assert (nft.level, nft.subject) == ("warn", "nft")
    assert "networks" in nft.detail and nft.fix == "apt-get install --no-install-recommends nftables"
    assert doctor_checks.can_run_sandboxes(findings)
    assert "networks" not in {f.subject for f in findings if f.level == "ok"}  # its purpose is not reported whole


def test_missing_build_and_test_tools_only_warn():
    findings = doctor_checks.tool_findings(**_without("mmdebstrap", "systemd-nspawn", "mcopy"))
    assert doctor_checks.can_run_sandboxes(findings)
    assert {f.subject: f.level for f in findings if f.level != "ok"} == {
        "mmdebstrap": "warn", "systemd-nspawn": "warn", "mcopy": "warn"}
    assert any(f.fix == "apt-get install --no-install-recommends mmdebstrap" for f in findings)


def test_a_missing_jail_tool_fails_only_when_the_spec_demands_the_jail():
    assert doctor_checks.can_run_sandboxes(doctor_checks.tool_findings(**_without("bwrap")))
    demanded = doctor_checks.tool_findings(**_without("bwrap"), required={"sandboxes", "jail"})
    assert [f.subject for f in demanded if f.level == "fail"] == ["bwrap"]


def test_low_disk_warns(tmp_path: Path):
    assert doctor_checks.disk_finding(tmp_path / "a" / "b", lambda p: 1 << 30).level == "warn"
    assert doctor_checks.disk_finding(tmp_path, lambda p: 100 << 30).level == "ok"


def test_tcg_fallback_is_a_warning_not_a_failure():
    findings = doctor_checks.accelerator_findings("no /dev/kvm", ("tcg", "KVM not usable"))
    assert doctor_checks.can_run_sandboxes(findings)
    assert {f.level for f in findings} == {"warn"}


def test_a_root_only_kvm_device_is_a_kvm_finding_with_the_group_fix_not_a_missing_jail():
    """The jail gives the VM user /dev/kvm's group, never root's: a 0600 root:root device loses KVM, not isolation."""
    for mode, gid in ((0o600, 0), (0o660, 0), (0o600, 108)):
        problem = jail.kvm_jail_problem(stat.S_IFCHR | mode, gid)
        assert problem is not None and "jailed VM user" in problem and "TCG" in problem
        assert "ISOLATION" not in problem.upper()
        (kvm, _) = doctor_checks.accelerator_findings(None, ("tcg", "KVM not usable"), problem)
        assert (kvm.level, kvm.subject, kvm.detail) == ("warn", "kvm device", problem)
        assert "chgrp kvm /dev/kvm; chmod 660 /dev/kvm" in kvm.fix and 'KERNEL=="kvm", GROUP="kvm"' in kvm.fix
    for mode, gid in ((0o660, 108), (0o666, 0)):  # the kvm group with rw, or a world-usable device
        assert jail.kvm_jail_problem(stat.S_IFCHR | mode, gid) is None
    (kvm, _) = doctor_checks.accelerator_findings(None, ("kvm", "probe booted"), None)
    assert (kvm.level, kvm.subject) == ("ok", "kvm device")


def test_a_qemu_older_than_10_fails_and_the_finding_names_the_fix():
    old = doctor_checks.qemu_finding((7, 2), "7.2.19 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
    assert (old.level, old.subject) == ("fail", "qemu version")
    assert old.detail == "7.2.19 (Debian 1:7.2+dfsg-7+deb12u18+b3): older than the supported 10.0"
    assert "make host-packages" in old.fix and "bookworm-backports" in old.fix and "appliance deploy" in old.fix
    assert not doctor_checks.can_run_sandboxes([old])
    assert doctor_checks.qemu_finding((9, 2), "9.2.1").level == "fail"
    for release in ((10, 0), (10, 1), (11, 0)):
        assert doctor_checks.qemu_finding(release, "x").level == "ok"
    unknown = doctor_checks.qemu_finding(None, "", "cannot tell the QEMU version from ['bash: no']")
    assert unknown.level == "fail" and "cannot tell" in unknown.detail


def test_doctor_reports_this_machines_qemu_version(tmp_path):
    """The real command on this machine (QEMU 10 from `make setup`): the version line is there and ok."""
    from click.testing import CliRunner

    from appliance.commands.doctor import doctor_command

    spec = tmp_path / "appliance.toml"
    spec.write_text(f'[paths]\nimages_dir = "{tmp_path / "images"}"\ncache_dir = "{tmp_path / "cache"}"\n')
    result = CliRunner().invoke(doctor_command, ["--spec", str(spec)])
    (line,) = [line for line in result.output.splitlines() if "qemu version" in line]
    assert line.startswith("✓") and " 10." in line, result.output
