"""The API service as an operator checks it: installed offline into its venv, configured from variables, secrets
readable by root only, running unprivileged under a hardened unit, answering a real HTTPS request through the
node's HAProxy (test_node_proxy.py checks the front door itself).

The unit's cgroup settings (DeviceAllow, DevicePolicy) are declared but not enforced on this cgroup-v1 test
machine, so they are checked with `systemctl show`; privileges (user, capabilities, no_new_privs) are checked on the
running process, where the kernel enforces them everywhere.
"""

import json
import os
import ssl
import urllib.request
from pathlib import Path

import pytest

testinfra_hosts = ["all"]

UNIT = "appliance-api.service"
KEY = "molecule-test-key-0123456789"


def _show(host, *properties: str) -> dict[str, str]:
    output = host.check_output(f"systemctl show {UNIT} " + " ".join(f"--property={p}" for p in properties))
    values: dict[str, str] = {}
    for line in output.splitlines():
        name, _, value = line.partition("=")
        values[name] = f"{values[name]}\n{value}" if name in values else value
    return values


@pytest.fixture(scope="module")
def address(host):
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def tls():
    """Trusts the site CA the node_proxy role made on the control machine, and nothing else."""
    return ssl.create_default_context(cafile=Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "site-ca" / "ca.pem")


def test_service_is_enabled_and_running(host):
    service = host.service(UNIT)
    assert service.is_enabled
    assert service.is_running


def test_healthz_answers_from_the_control_machine(address, tls):
    with urllib.request.urlopen(f"https://{address}:8443/v1/healthz", timeout=10, context=tls) as response:
        assert response.status == 200
        assert json.load(response) == {"status": "ok"}


def test_api_refuses_a_request_without_a_key_and_accepts_the_configured_one(address, tls):
    request = urllib.request.Request(f"https://{address}:8443/v1/sandboxes")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10, context=tls)
    assert refused.value.code == 401
    request.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
        assert response.status == 200


def test_venv_is_installed_from_the_wheelhouse_and_linked(host):
    venv = host.file("/opt/appliance/venv")
    assert venv.is_symlink and venv.linked_to.startswith("/opt/appliance/releases/")
    assert host.file("/opt/appliance/venv/bin/appliance").is_file
    assert host.run("/opt/appliance/venv/bin/appliance --help").rc == 0
    # pip was never given an index: the wheelhouse was the only source
    assert host.file(venv.linked_to.rsplit("/venv", 1)[0] + "/wheels").is_directory


def test_service_account_is_unprivileged_and_in_group_kvm(host):
    user = host.user("appliance")
    assert user.exists and user.shell == "/usr/sbin/nologin"
    assert "kvm" in user.groups
    assert "appliance-vm" in user.groups  # to reach the sockets of the VMs the launcher starts
    assert user.uid < 1000  # a system account
    vm_user = host.user("appliance-vm")
    assert vm_user.exists and vm_user.uid < 1000 and vm_user.shell == "/usr/sbin/nologin"


def test_the_vmm_launcher_runs_as_root_and_serves_only_the_apis_group(host):
    launcher = host.service("appliance-launcher.service")
    assert launcher.is_enabled and launcher.is_running
    socket_file = host.file("/run/appliance-launcher.sock")
    assert socket_file.is_socket and socket_file.user == "root" and socket_file.group == "appliance"
    assert socket_file.mode == 0o660
    spec = host.file("/etc/appliance/appliance.toml").content_string
    assert 'launcher_socket = "/run/appliance-launcher.sock"' in spec
    kill_mode = host.check_output("systemctl show appliance-launcher.service --property=KillMode")
    assert kill_mode == "KillMode=process"  # its VMs outlive a restart of it


# One launcher request from the node's venv: prints the answer, or the client's error (one line).
PING = ("from pathlib import Path; from service.engine import LauncherError; "
        "from service.engine.launch import RemoteLauncher\n"
        "try: print(RemoteLauncher(Path('/run/appliance-launcher.sock'), 30).request('ping'))\n"
        "except LauncherError as exc: print(exc)")


def test_the_vmm_launcher_serves_the_apis_user_and_refuses_another_uid_in_its_group(host):
    """The socket's mode lets the group in; SO_PEERCRED lets only root and the user the unit's --allow-user names."""
    python = "/opt/appliance/venv/bin/python"
    gid = host.group("appliance").gid
    served = host.check_output(f"runuser -u appliance -- {python} -c \"{PING}\"")
    assert "'ok': True" in served, served
    other = host.check_output(f"setpriv --reuid=64124 --regid=64124 --groups={gid} -- {python} -c \"{PING}\"")
    assert other.startswith("the VMM launcher refused ping: uid 64124 may not use this launcher"), other


def test_secrets_and_config_files_have_tight_permissions(host):
    env = host.file("/etc/appliance/api.env")
    assert env.user == "root" and env.group == "root" and env.mode == 0o600
    assert f"APPLIANCE_API_KEYS={KEY}" in env.content_string
    spec = host.file("/etc/appliance/appliance.toml")
    assert spec.user == "root" and spec.group == "appliance" and spec.mode == 0o640
    assert KEY not in spec.content_string
    assert 'guest_image = "/var/lib/appliance-images/current"' in spec.content_string
    config_dir = host.file("/etc/appliance")
    assert config_dir.group == "appliance" and config_dir.mode == 0o750
    state = host.file("/var/lib/appliance")
    assert state.user == "appliance" and state.mode == 0o750


def test_unit_declares_the_hardening(host):
    shown = _show(host, "User", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                  "CapabilityBoundingSet", "AmbientCapabilities", "DevicePolicy", "DeviceAllow",
                  "RestrictNamespaces", "RestrictSUIDSGID", "ProtectKernelModules", "ProtectKernelTunables",
                  "SystemCallFilter", "StateDirectory", "SupplementaryGroups", "StandardOutput", "ProtectProc")
    assert shown["User"] == "appliance"
    assert shown["NoNewPrivileges"] == "yes"
    assert shown["ProtectSystem"] == "strict"
    assert shown["ProtectHome"] == "yes"
    assert shown["PrivateTmp"] == "yes"
    assert shown["CapabilityBoundingSet"] == ""
    assert shown["AmbientCapabilities"] == ""
    assert shown["DevicePolicy"] == "closed"
    assert "/dev/kvm rw" in shown["DeviceAllow"]
    assert shown["RestrictNamespaces"] == "yes"
    assert shown["RestrictSUIDSGID"] == "yes"
    assert shown["ProtectKernelModules"] == "yes" and shown["ProtectKernelTunables"] == "yes"
    assert shown["SystemCallFilter"]  # an allow-list is set (@system-service)
    assert shown["StateDirectory"] == "appliance"
    assert shown["SupplementaryGroups"] == "kvm"
    assert shown["StandardOutput"] == "journal"
    assert shown["ProtectProc"] == "default"  # it must see its VMs' processes (the VM user's) to know they live


def test_running_process_has_no_privileges(host):
    pid = _show(host, "MainPID")["MainPID"]
    assert pid != "0"
    status = host.file(f"/proc/{pid}/status").content_string
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = host.user("appliance").uid
    assert fields["Uid"].split()[:2] == [str(uid), str(uid)]
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_service_logs_to_the_journal(host):
    assert host.run(f"journalctl --unit={UNIT} --no-pager --lines=5 --quiet").stdout.strip()
