"""The root VMM launcher serving an unprivileged engine: the deployed shape of a node (the API is not root).

The client runs as a throw-away uid that is not root and holds no capability but CAP_DAC_READ_SEARCH (so it can
read this checkout wherever CI put it; it grants no power over processes, users or networks). It boots a sandbox,
clones a template, and gives a sandbox a network, all through the launcher; the test checks from /proc what ran.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from service.launcher import LauncherConfig, serve

from service import settings
from service.engine import LauncherError
from service.engine.jail import Jail
from service.engine.launch import RemoteLauncher
from service.engine.launch_checks import LauncherScope
from service.engine.netpolicy import NETNS_PREFIX
from tests.configs import jail_policy, spec_with
from tests.vmtools import kill_qemus_under

pytestmark = pytest.mark.integration
CLIENT_UID = 64123  # no passwd entry needed: setpriv takes numbers
REPO = Path(__file__).resolve().parents[2]

CLIENT = r"""
import json, os, sys
from pathlib import Path
from dataclasses import replace
from service import settings
from service.engine import Engine, network
from service.engine.netpolicy import parse_policy, resolve

image, run, sock = (Path(a) for a in sys.argv[1:4])
def say(**kw):
    print(json.dumps(kw), flush=True)
    sys.stdin.readline()

from tests.configs import spec_with
spec = spec_with(guest={"accelerator": "tcg", "memory_mib": 512}, paths={"run_dir": run})
engine = Engine(replace(settings.engine_config(spec, image), isolation=settings.jail_policy(spec),
                        launcher_socket=sock))
sb = engine.boot()
try:
    os.kill(sb.vm.pid, 0)
    can_signal = True
except PermissionError:
    can_signal = False
say(step="booted", uid=os.getuid(), pid=sb.vm.pid, vm_dir=str(sb.vm.dir), two=sb.run_code("1+1").text,
    can_signal=can_signal)
attachment = network.attach(sb.vm, sb.call, resolve(parse_policy({"egress": "none"})),
                            settings.network_settings(spec), engine.launcher)
say(step="network", slot=attachment.slot.index,
    interfaces=sb.run_code("import os; sorted(os.listdir('/sys/class/net'))").text)
template = engine.make_template(1, "warm = 'from the template'")
clone = engine.clone(template, "lt-clone")
say(step="cloned", pid=clone.vm.pid, warm=clone.run_code("warm").text)
clone.close()
template.remove()
sb.close()
say(step="closed")
"""


@pytest.fixture(scope="module")
def setup(image_dir):
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the launcher needs root and bubblewrap")
    vm_gid = Jail(jail_policy()).identity.gid  # creates the VM user if needed
    root = Path(f"/dev/shm/appl-lt-{secrets.token_hex(3)}")
    root.mkdir(mode=0o755)
    run = root / "run"
    run.mkdir()
    os.chown(run, CLIENT_UID, CLIENT_UID)
    socket_path = root / "launcher.sock"
    config = LauncherConfig(
        socket_path=socket_path, scope=LauncherScope(run_root=run, image_roots=(image_dir.parent,)),
        policy=jail_policy(), network=settings.network_settings(spec_with()), client_group="appliance-vm",
        allowed_uids=frozenset({CLIENT_UID}),
    )
    server = serve(config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"root": root, "run": run, "socket": socket_path, "vm_gid": vm_gid, "image": image_dir}
    finally:
        server.shutdown()
        server.server_close()
        kill_qemus_under(root)
        for netns in Path("/run/netns").glob(f"{NETNS_PREFIX}*"):
            marker = run / ".netslots" / netns.name.removeprefix(NETNS_PREFIX)
            if marker.exists():
                subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_an_unprivileged_engine_gets_jailed_vms_networks_and_clones_through_the_launcher(setup):
    argv = [
        "setpriv", f"--reuid={CLIENT_UID}", f"--regid={CLIENT_UID}", f"--groups={setup['vm_gid']}",
        "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
        "--bounding-set=-all,+dac_read_search", "--", sys.executable, "-c", CLIENT,
        str(setup["image"]), str(setup["run"]), str(setup["socket"]),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'image-builder/guest/agent'}", "HOME": "/nonexistent"}
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
    assert client.stdin is not None and client.stdout is not None

    def step() -> dict:
        line = client.stdout.readline()
        assert line, f"the client ended early (exit {client.wait()})"
        return json.loads(line)

    def go_on() -> None:
        client.stdin.write("\n")
        client.stdin.flush()

    try:
        booted = step()
        assert booted["step"] == "booted" and booted["two"] == "2" and booted["uid"] == CLIENT_UID
        assert booted["can_signal"] is False  # the API cannot touch its VMs' processes itself
        status = proc_status(booted["pid"])
        vm_uid = str(Jail(jail_policy()).identity.uid)
        assert set(status["Uid"].split()) == {vm_uid} and int(status["CapEff"], 16) == 0
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert Path(booted["vm_dir"]).stat().st_uid == 0  # made by the launcher, not the client
        go_on()

        networked = step()
        assert networked["interfaces"] == "['eth0', 'lo']"
        namespace = f"{NETNS_PREFIX}{networked['slot']}"
        assert (Path("/run/netns") / namespace).exists()
        go_on()

        cloned = step()
        assert cloned["warm"] == "'from the template'"
        assert set(proc_status(cloned["pid"])["Uid"].split()) == {vm_uid}
        go_on()

        assert step()["step"] == "closed"
        go_on()
        assert client.wait(timeout=60) == 0
        for pid in (booted["pid"], cloned["pid"]):
            assert not Path(f"/proc/{pid}").exists()
        assert not Path(booted["vm_dir"]).exists()
        assert not (Path("/run/netns") / namespace).exists()  # the launcher's stop removed the network too
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_the_launcher_refuses_what_is_outside_its_scope(setup, image_dir):
    client = RemoteLauncher(setup["socket"])
    from service.engine.machine import MachineConfig, machine_to_json

    base = MachineConfig(kernel=image_dir / "vmlinuz", initrd=image_dir / "initrd.img",
                         rootfs=image_dir / "rootfs.ext4", accelerator="tcg")
    secret = machine_to_json(base) | {"rootfs": "/etc/shadow"}
    for request, words in [
        ({"machine": secret, "run_dir": str(setup["run"])}, "outside the image directories"),
        ({"machine": machine_to_json(base), "run_dir": "/tmp"}, "not a directory under the run root"),
        ({"machine": machine_to_json(base) | {"memory_file": "/etc/passwd"}, "run_dir": str(setup["run"])},
         "memory file"),
        ({"machine": machine_to_json(base), "run_dir": str(setup["run"]), "incoming": "exec:sh -c id"},
         "incoming"),
    ]:
        with pytest.raises(LauncherError, match=words):
            client.request("start", **request)
    with pytest.raises(LauncherError, match="not a VM directory"):
        client.request("stop", vm_dir="/etc")
    with pytest.raises(LauncherError, match="unknown op"):
        client.request("format_disk")
