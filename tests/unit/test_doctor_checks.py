from pathlib import Path

from appliance import doctor_checks


def test_missing_qemu_fails_and_names_the_package():
    findings = doctor_checks.tool_findings(which=lambda tool: None if tool == "qemu-system-x86_64" else "/usr/bin/x")
    failing = [f for f in findings if f.level == "fail"]
    assert [f.subject for f in failing] == ["qemu-system-x86_64"]
    assert failing[0].fix == "apt-get install qemu-system-x86"
    assert not doctor_checks.can_run_sandboxes(findings)


def test_missing_build_tool_only_warns():
    findings = doctor_checks.tool_findings(which=lambda tool: None if tool == "mmdebstrap" else "/usr/bin/x")
    assert doctor_checks.can_run_sandboxes(findings)
    assert any(f.level == "warn" and f.fix == "apt-get install mmdebstrap" for f in findings)


def test_low_disk_warns(tmp_path: Path):
    assert doctor_checks.disk_finding(tmp_path / "a" / "b", lambda p: 1 << 30).level == "warn"
    assert doctor_checks.disk_finding(tmp_path, lambda p: 100 << 30).level == "ok"


def test_tcg_fallback_is_a_warning_not_a_failure():
    findings = doctor_checks.accelerator_findings("no /dev/kvm", ("tcg", "KVM not usable"))
    assert doctor_checks.can_run_sandboxes(findings)
    assert {f.level for f in findings} == {"warn"}
