"""`appliance deploy`'s summary: one line per failed host naming the task and the reason, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import deploy
from appliance.commands.deploy import deploy_command
from appliance.deploy import DeployError, Failure, failure_reason, summarize

CRASH = """Traceback (most recent call last):
  File "/tmp/ansible_module.py", line 12, in <module>
    main()
PermissionError: [Errno 13] Permission denied: '/etc/shadow'
"""


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"msg": "KVM is not usable on h1"}, "KVM is not usable on h1"),
        (
            {"msg": "MODULE FAILURE\nSee stdout/stderr for the exact error", "module_stderr": CRASH, "rc": 1},
            "module crashed: PermissionError: [Errno 13] Permission denied: '/etc/shadow'",
        ),
        (
            {"msg": "non-zero return code", "rc": 2, "stderr": "warning: x\nnft: syntax error near 'drop'\n"},
            "exit 2: nft: syntax error near 'drop'",
        ),
        (
            {"msg": "One or more items failed", "item": {"msg": "sha256 differs", "label": "rootfs.ext4"}},
            "rootfs.ext4: sha256 differs",
        ),
        ({"msg": "line one\n   line two"}, "line one line two"),
        ({}, "no reason given"),
    ],
)
def test_failure_reason_is_one_line(event, reason):
    assert failure_reason(event) == reason


def test_failure_reason_is_cut_to_a_readable_length():
    reason = failure_reason({"msg": "x" * 1000})
    assert len(reason) == 300 and reason.endswith("…")


def _events(*events: dict) -> list[dict]:
    return [{"time": float(i), **event} for i, event in enumerate(events)]


def test_summary_names_the_failure_that_stopped_each_host_and_ignores_rescued_ones():
    events = _events(
        {"event": "task", "name": "Gathering Facts"},
        {"event": "unreachable", "host": "h2", "task": "Gathering Facts", "msg": "ssh: connect to host: refused"},
        {"event": "task", "name": "Ask GET /v1/healthz"},
        {"event": "failed", "host": "h1", "task": "Ask GET /v1/healthz", "msg": "connection refused"},
        {"event": "task", "name": "Fail with what the service logged"},
        {"event": "failed", "host": "h1", "task": "Fail with what the service logged", "msg": "no healthz in 60s"},
        {"event": "failed", "host": "h3", "task": "Probe", "msg": "rescued", "ignored": False},
        {"event": "failed", "host": "h4", "task": "Optional", "msg": "ignored", "ignored": True},
        {
            "event": "stats",
            "hosts": {
                "h1": {"ok": 5, "changed": 1, "failures": 1, "unreachable": 0, "skipped": 0, "rescued": 0},
                "h2": {"ok": 0, "changed": 0, "failures": 0, "unreachable": 1, "skipped": 0, "rescued": 0},
                "h3": {"ok": 9, "changed": 0, "failures": 0, "unreachable": 0, "skipped": 0, "rescued": 1},
                "h4": {"ok": 9, "changed": 0, "failures": 0, "unreachable": 0, "skipped": 0, "rescued": 0},
            },
        },
    )
    summary = summarize(events)
    assert summary.failures == [
        Failure("h2", "Gathering Facts", "ssh: connect to host: refused", unreachable=True),
        Failure("h1", "Fail with what the service logged", "no healthz in 60s"),
    ]
    assert [f.line() for f in summary.failures] == [
        "h2: unreachable at 'Gathering Facts': ssh: connect to host: refused",
        "h1: failed at 'Fail with what the service logged': no healthz in 60s",
    ]
    assert not summary.ok
    assert next(iter(summary.host_lines())) == "h1: failed (1 changed, 5 ok, 1 failed, 0 skipped)"
    assert summary.slowest == [
        ("Fail with what the service logged", 4.0),
        ("Gathering Facts", 2.0),
        ("Ask GET /v1/healthz", 2.0),
    ]


def test_a_run_without_failures_is_ok():
    summary = summarize(
        _events(
            {"event": "task", "name": "t"}, {"event": "stats", "hosts": {"h": {"ok": 3, "changed": 0, "failures": 0}}}
        )
    )
    assert summary.ok and summary.failures == []
    assert summarize([]).ok is False  # no host ran anything: not a success


def test_events_file_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"event": "task", "name": "a"}) + '\n{"event": "fai')
    assert deploy.read_events(path) == [{"event": "task", "name": "a"}]
    assert deploy.read_events(tmp_path / "absent") == []


def test_playbook_command_line():
    argv = deploy.playbook_argv(
        "ansible-playbook",
        Path("/b/ansible/playbooks/site.yml"),
        Path("/inv.yml"),
        {"appliance_bundle_dir": "/b"},
        check=True,
        limit="node1",
    )
    assert argv == [
        "ansible-playbook",
        "/b/ansible/playbooks/site.yml",
        "--inventory",
        "/inv.yml",
        "--extra-vars",
        '{"appliance_bundle_dir": "/b"}',
        "--check",
        "--diff",
        "--limit",
        "node1",
    ]


def test_playbook_environment_uses_only_the_bundle_roles_and_our_callback(tmp_path):
    env = deploy.playbook_env({"HOME": "/root", "ANSIBLE_ROLES_PATH": "/elsewhere"}, tmp_path, tmp_path / "ev")
    assert env["ANSIBLE_ROLES_PATH"] == str(tmp_path / "roles")
    assert env["ANSIBLE_CONFIG"] == str(tmp_path / "ansible.cfg")
    assert env["ANSIBLE_CALLBACKS_ENABLED"] == "appliance_events"
    assert Path(env["ANSIBLE_CALLBACK_PLUGINS"], "appliance_events.py").is_file()
    assert env["HOME"] == "/root"


def test_bad_arguments_fail_before_ansible_runs(tmp_path):
    with pytest.raises(DeployError, match="no such inventory"):
        deploy.run_deploy(inventory=tmp_path / "absent.yml", bundle=tmp_path / "b.tar", quiet=True)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    with pytest.raises(DeployError, match="unknown playbook"):
        deploy.run_deploy(inventory=inventory, bundle=tmp_path / "b.tar", playbook="everything", quiet=True)
    with pytest.raises(DeployError, match="no such bundle file"):
        deploy.run_deploy(inventory=inventory, bundle=tmp_path / "b.tar", quiet=True)


def test_command_prints_one_line_per_problem_and_exits_non_zero(tmp_path):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    junk = tmp_path / "bundle.tar"
    junk.write_bytes(b"\0" * 2048)
    result = CliRunner().invoke(deploy_command, ["-i", str(inventory), "--bundle", str(junk), "-q"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_callback_and_summary_on_a_real_local_run(tmp_path):
    """ansible-playbook with our callback, against localhost only (connection: local): what deploy would print."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - name: Say hello\n      ansible.builtin.debug: {msg: hi}\n"
        "    - name: Try and recover\n      block:\n"
        "        - {name: Fail inside a block, ansible.builtin.fail: {msg: rescued soon}}\n"
        "      rescue:\n        - {name: Recover, ansible.builtin.debug: {msg: ok}}\n"
        "    - name: Check the answer\n      ansible.builtin.assert:\n        that: 6 * 7 == 41\n"
        "        fail_msg: the answer is not 41\n"
    )
    events_file = tmp_path / "events.jsonl"
    env = deploy.playbook_env(os.environ, tmp_path, events_file)
    env.pop("ANSIBLE_CONFIG")
    ansible_playbook = Path(sys.executable).parent / "ansible-playbook"
    result = subprocess.run(
        [str(ansible_playbook), str(playbook), "-i", "localhost,"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stdout + result.stderr
    summary = summarize(deploy.read_events(events_file))
    assert [f.line() for f in summary.failures] == ["localhost: failed at 'Check the answer': the answer is not 41"]


def test_the_site_ca_is_kept_beside_the_inventory_unless_told_otherwise(tmp_path):
    inventory = tmp_path / "fleet" / "inventory.yml"
    given = deploy.deploy_vars(tmp_path / "unpacked", inventory, None)
    assert given == {"appliance_bundle_dir": str(tmp_path / "unpacked"),
                     "appliance_site_ca_dir": str(tmp_path / "fleet" / "appliance-ca")}
    chosen = deploy.deploy_vars(tmp_path / "unpacked", inventory, tmp_path / "ca")
    assert chosen["appliance_site_ca_dir"] == str(tmp_path / "ca")
