"""The root VMM launcher serving an unprivileged engine: the deployed shape of a node (the API is not root).

The launcher is the real `appliance launcher` command, started as the node's unit starts it (`--group`,
`--allow-user`, `--spec`). The client runs as a throw-away uid that is not root and holds no capability but
CAP_DAC_READ_SEARCH (so it can read this checkout wherever CI put it; it grants no power over processes, users or
networks). It boots a sandbox, clones a template, and gives a sandbox a network, all through the launcher; the
test checks from /proc what ran. A second throw-away uid, in the socket's group too, is refused by the peer check.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine import LauncherError
from service.engine.jail import Jail
from service.engine.launch import RemoteLauncher
from service.engine.machine import MachineConfig, machine_to_json
from service.engine.netpolicy import NETNS_PREFIX
from tests.configs import jail_policy
from tests.vmtools import kill_qemus_under, qemu_pids_under

pytestmark = pytest.mark.integration
CLIENT_UID = 64123  # the API's user: no passwd entry needed, setpriv and --allow-user take numbers
OTHER_UID = 64124  # another local user who is in the socket's group but not the API
REPO = Path(__file__).resolve().parents[2]
APPLIANCE = Path(sys.executable).parent / "appliance"

# One launcher request as some uid: prints {"answer": ...} or {"error": "..."} (the LauncherError's text).
REQUEST = r"""
import json, sys
from pathlib import Path
from service.engine import LauncherError
from service.engine.launch import RemoteLauncher
sock, op, args = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
try:
    print(json.dumps({"answer": RemoteLauncher(sock, timeout_s=60).request(op, **args)}))
except LauncherError as exc:
    print(json.dumps({"error": str(exc)}))
"""

CLIENT = r"""
import json, os, sys
from pathlib import Path
from dataclasses import replace
from service import settings
from service.engine import Engine, network
from service.engine.netpolicy import parse_policy, resolve
from tests.configs import spec_with

image, run, sock = (Path(a) for a in sys.argv[1:4])
def say(**kw):
    print(json.dumps(kw), flush=True)
    sys.stdin.readline()

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
# access() checks the plain permissions of this uid (no capability): what the node's API user has
say(step="cloned", pid=clone.vm.pid, warm=clone.run_code("warm").text,
    template_rw=os.access(template.directory / "memory", os.R_OK | os.W_OK))
clone.close()
template.remove()
sb.close()
say(step="closed")
"""


def as_uid(uid: int, vm_gid: int) -> list[str]:
    """A command prefix: this uid, in the VM group (so the socket's mode lets it in), no capability but reading."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={vm_gid}",
            "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
            "--bounding-set=-all,+dac_read_search", "--"]


CLIENT_ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'image-builder/guest/agent'}", "HOME": "/nonexistent"}


def request_as(uid: int | None, vm_gid: int, socket_path: Path, op: str, **args) -> dict:
    """What a client of this uid (None: root) gets for one request, through the real client, in its own process."""
    prefix = [] if uid is None else as_uid(uid, vm_gid)
    done = subprocess.run([*prefix, sys.executable, "-c", REQUEST, str(socket_path), op, json.dumps(args)],
                          capture_output=True, text=True, env=CLIENT_ENV, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_launcher(root: Path, name: str, run: Path, image_dir: Path, *options: str) -> subprocess.Popen:
    """`appliance launcher` as the node's unit runs it, on its own spec; returns once root's ping is answered."""
    socket_path = root / f"{name}.sock"
    spec = root / f"{name}.toml"
    spec.write_text(f'[isolation]\njail = "on"\nlauncher_socket = "{socket_path}"\nlauncher_dir = "{root / name}"\n'
                    f'[paths]\nrun_dir = "{run}"\nguest_image = "{image_dir}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}  # only the spec file counts
    with open(root / f"{name}.log", "wb") as log:
        process = subprocess.Popen([str(APPLIANCE), "launcher", "--group", "appliance-vm", *options, "--spec",
                                    str(spec)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            RemoteLauncher(socket_path, timeout_s=10).request("ping")
            return process
        except LauncherError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_launcher(process)
                raise RuntimeError(f"the launcher did not come up: {(root / f'{name}.log').read_text()}") from None
            time.sleep(0.1)


def stop_launcher(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def setup(image_dir) -> Iterator[dict]:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the launcher needs root and bubblewrap")
    vm_gid = Jail(jail_policy()).identity.gid  # creates the VM user if needed
    root = Path(f"/dev/shm/appl-lt-{secrets.token_hex(3)}")
    root.mkdir(mode=0o755)
    run = root / "run"
    run.mkdir()
    os.chown(run, CLIENT_UID, CLIENT_UID)
    launchers: list[subprocess.Popen] = []
    try:
        # the unit's command line: the API's user is the one --allow-user names
        launchers.append(start_launcher(root, "launcher", run, image_dir, "--allow-user", str(CLIENT_UID)))
        yield {"root": root, "run": run, "socket": root / "launcher.sock", "vm_gid": vm_gid, "image": image_dir,
               "launchers": launchers}
    finally:
        for process in launchers:
            stop_launcher(process)
        kill_qemus_under(root)
        for netns in Path("/run/netns").glob(f"{NETNS_PREFIX}*"):
            marker = root / "launcher" / ".netslots" / netns.name.removeprefix(NETNS_PREFIX)
            if marker.exists():
                subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_an_unprivileged_engine_gets_jailed_vms_networks_and_clones_through_the_launcher(setup):
    argv = [*as_uid(CLIENT_UID, setup["vm_gid"]), sys.executable, "-c", CLIENT,
            str(setup["image"]), str(setup["run"]), str(setup["socket"])]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=CLIENT_ENV,
                              cwd="/")
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
        # the engine reads the template's extents and punches zero pages out of it again: without the capability
        # this test's client has, a node's API user could not (the pool keeper then died at its first template)
        assert cloned["template_rw"], "the template's RAM file is not readable and writable by the engine"
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
    base = MachineConfig(kernel=image_dir / "vmlinuz", initrd=image_dir / "initrd.img",
                         rootfs=image_dir / "rootfs.ext4", accelerator="tcg")
    secret = machine_to_json(base) | {"rootfs": "/etc/shadow"}
    for request, words in [
        ({"machine": secret, "run_dir": str(setup["run"])}, "outside the image directories"),
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


def test_a_peer_of_another_uid_is_refused_and_the_apis_uid_is_served(setup):
    """SO_PEERCRED, not the socket's mode: OTHER_UID is in the socket's group, yet its start is refused by name and
    starts nothing; the same request from the uid the launcher's command line allows boots a VM."""
    machine = machine_to_json(MachineConfig(kernel=setup["image"] / "vmlinuz", initrd=setup["image"] / "initrd.img",
                                            rootfs=setup["image"] / "rootfs.ext4", accelerator="tcg",
                                            memory_mib=256))
    run = setup["run"] / "peers"
    run.mkdir()
    start = {"machine": machine, "run_dir": str(run)}

    def other(op: str, **args) -> dict:
        return request_as(OTHER_UID, setup["vm_gid"], setup["socket"], op, **args)

    def client(op: str, **args) -> dict:
        return request_as(CLIENT_UID, setup["vm_gid"], setup["socket"], op, **args)

    assert other("start", **start) == {"error": f"the VMM launcher refused start: uid {OTHER_UID} may not use this "
                                                f"launcher (it serves root, uid {CLIENT_UID})"}
    assert not list((setup["root"] / "launcher").glob("vm-*")) and not qemu_pids_under(setup["root"])
    for op, args in (("ping", {}), ("stop", {"vm_dir": str(run / "vm-x")})):
        assert "may not use this launcher" in other(op, **args)["error"]

    served = client("start", **start)
    assert "error" not in served, served
    vm_dir, pid = Path(served["answer"]["vm_dir"]), served["answer"]["pid"]
    try:
        assert vm_dir.parent == setup["root"] / "launcher" and pid in qemu_pids_under(setup["root"])
    finally:
        assert client("stop", vm_dir=str(vm_dir)) == {"answer": {"ok": True}}
    assert not vm_dir.exists() and pid not in qemu_pids_under(setup["root"])


def test_a_launcher_told_no_user_does_not_start(setup):
    """A launcher that would serve no one but root is a misconfiguration: said at once, in one line."""
    spec = setup["root"] / "launcher.toml"  # the running launcher's spec: only the flag differs
    done = subprocess.run([str(APPLIANCE), "launcher", "--group", "appliance-vm", "--spec", str(spec)],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")})
    assert done.returncode != 0
    assert done.stderr.strip() == ("Error: --allow-user is required: name the API's user (the launcher serves only "
                                   "it)")
