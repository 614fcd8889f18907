"""The root VMM launcher under attack by its own client: the real `appliance launcher` (root), attacked by a
throw-away uid in the VM group (what the API's user is on a node, and what a compromised API would be).

The client plants links wherever root writes, swaps directories for links while a start runs (a few hundred
times), names image files in a directory it can write and flips them to a link while a start runs, and a second
uid that is not the API's asks too. Nothing outside the launcher's own directories may change: a canary tree of
root's files and directories is compared before and after each attack. Most attacks need no boot: a start of a
kernel that is not one runs every file step of a real start (VM dir, cgroups list, log, pidfile) and then fails
in QEMU at once (now and then after QEMU's sockets appeared: such a start counts as started and is stopped).
One VM is started (paused, never booted) for the network attack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine.jail import Jail
from service.engine.launch import RemoteLauncher
from service.engine.machine import MachineConfig, machine_to_json
from service.engine.netpolicy import NETNS_PREFIX
from tests.configs import jail_policy
from tests.integration.test_launcher import (
    APPLIANCE,
    CLIENT_ENV,
    CLIENT_UID,
    OTHER_UID,
    as_uid,
    request_as,
    start_launcher,
    stop_launcher,
)
from tests.vmtools import kill_qemus_under

pytestmark = pytest.mark.integration
RACES = 200  # starts raced by a directory swap and by links planted in the VM dir
IMAGE_RACES = 30  # starts raced by an image file flipped to a link
PLANTED = ("qemu.log", "qemu.pid", "cgroups", "launcher", "network.json")  # every name root writes in a VM dir

# The attacker: runs as the client uid, talks to the launcher through the real client, and races it from a thread.
ATTACK = r"""
import json, os, sys, threading
from pathlib import Path
from service.engine import LauncherError
from service.engine.launch import RemoteLauncher
from service.engine.machine import MachineConfig, machine_to_json

cfg = json.loads(sys.argv[1])
sock, run, vms, canary = (Path(cfg[k]) for k in ("socket", "run", "vms", "canary"))
client = RemoteLauncher(sock, timeout_s=60)
results = []

def swap_and_plant(vm_id, stop):
    # (1) the VM dir where a client's run_dir would put it: renamed away and replaced by a link to root's directory;
    # (2) links planted under every name root writes in the VM dir where the launcher puts it.
    mine, theirs = run / f"vm-{vm_id}", vms / f"vm-{vm_id}"
    swapped = False
    while not stop.is_set():
        if not swapped:
            try:
                os.rename(mine, run / f"moved-{vm_id}")
                os.symlink(canary / "dir", mine)
                swapped = True
            except OSError:
                pass
        for name in cfg["planted"]:
            try:
                os.symlink(canary / "dir" / "file", theirs / name)
            except OSError:
                pass

def flip_image(path, stop):
    while not stop.is_set():
        try:
            os.rename(path.with_name("real"), path)
            os.rename(path, path.with_name("real"))
            os.symlink(canary / "secret", path)
            os.unlink(path)
        except OSError:
            pass

def start(vm_id, machine, racer, *racer_args):
    stop = threading.Event()
    thread = threading.Thread(target=racer, args=(*racer_args, stop), daemon=True)
    thread.start()
    try:
        answer = client.request("start", machine=machine, run_dir=str(run), vm_id=vm_id, incoming="defer")
        results.append({"ok": True, "vm_dir": answer["vm_dir"], "pid": answer["pid"]})
        return answer
    except LauncherError as exc:
        results.append({"ok": False, "error": str(exc)})
    finally:
        stop.set()
        thread.join()

if cfg["mode"] == "race":
    for i in range(cfg["count"]):
        # QEMU makes its sockets before it reads the kernel: now and then a start counts as started, and is stopped
        if start(f"race-{i}", cfg["machine"], swap_and_plant, f"race-{i}"):
            client.request("stop", vm_dir=results[-1]["vm_dir"])
elif cfg["mode"] == "image":
    rootfs = Path(cfg["machine"]["rootfs"])
    for i in range(cfg["count"]):
        start(f"img-{i}", cfg["machine"], flip_image, rootfs)  # a VM started stays up: the test looks inside it
print(json.dumps(results))
"""


def snapshot(tree: Path) -> dict[str, tuple]:
    """Everything about a tree that root could be made to change: kinds, owners, modes, contents, link targets."""
    state: dict[str, tuple] = {}
    for path in [tree, *sorted(tree.rglob("*"))]:
        info = path.lstat()
        if path.is_symlink():
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISDIR(info.st_mode):
            content = sorted(child.name for child in path.iterdir())
        else:  # a socket or fifo someone made there
            content = stat.S_IFMT(info.st_mode)
        state[str(path.relative_to(tree))] = (info.st_mode, info.st_uid, info.st_gid, content)
    return state


def attack(setup: dict, mode: str, machine: dict, count: int) -> list[dict]:
    cfg = {"socket": str(setup["socket"]), "run": str(setup["run"]), "vms": str(setup["vms"]),
           "canary": str(setup["canary"]), "planted": PLANTED, "mode": mode, "machine": machine, "count": count}
    done = subprocess.run([*as_uid(CLIENT_UID, setup["vm_gid"]), sys.executable, "-c", ATTACK, json.dumps(cfg)],
                          capture_output=True, text=True, env=CLIENT_ENV, cwd="/", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def machine_json(image: Path, **changes) -> dict:
    return machine_to_json(MachineConfig(kernel=image / "vmlinuz", initrd=image / "initrd.img",
                                         rootfs=image / "rootfs.ext4", accelerator="tcg", memory_mib=128)) | changes


def make_image(directory: Path, kernel: Path | None, owner: int = 0) -> Path:
    """kernel, initrd and a small root disk (QEMU only opens it: the VM never runs). No kernel: a file that is not
    one, so QEMU exits at once after the launcher did every step of a start."""
    directory.mkdir(parents=True)
    if kernel is None:
        (directory / "vmlinuz").write_bytes(b"not a kernel\n" * 64)
        (directory / "initrd.img").write_bytes(b"\0" * 4096)
    else:
        shutil.copyfile(kernel / "vmlinuz", directory / "vmlinuz")
        shutil.copyfile(kernel / "initrd.img", directory / "initrd.img")
    with open(directory / "rootfs.ext4", "wb") as disk:
        disk.truncate(8 << 20)
    for path in (directory, *directory.iterdir()):
        os.chown(path, owner, owner)
    return directory


@pytest.fixture(scope="module")
def setup(image_dir) -> Iterator[dict]:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the launcher needs root and bubblewrap")
    vm_gid = Jail(jail_policy()).identity.gid  # creates the VM user if needed
    root = Path(f"/dev/shm/appl-la-{secrets.token_hex(3)}")
    root.mkdir(mode=0o755)
    run = root / "run"  # the client's own run directory (its templates go here)
    run.mkdir()
    os.chown(run, CLIENT_UID, CLIENT_UID)
    canary = root / "canary"  # root's: stands for everything on the host outside the launcher's directories
    (canary / "dir").mkdir(parents=True)
    (canary / "dir" / "file").write_text("root's file\n")
    (canary / "secret").write_text("root's secret\n")
    images = root / "images"
    make_image(images / "real", image_dir)
    make_image(images / "bad", None)
    launchers: list = []
    try:
        launchers.append(start_launcher(root, "launcher", run, images / "real", "--allow-user", str(CLIENT_UID)))
        yield {"root": root, "run": run, "vms": root / "launcher", "canary": canary, "images": images,
               "socket": root / "launcher.sock", "vm_gid": vm_gid, "before": snapshot(canary)}
    finally:
        for process in launchers:
            stop_launcher(process)
        kill_qemus_under(root)
        for marker in (root / "launcher" / ".netslots").glob("*"):
            subprocess.run(["ip", "netns", "delete", f"{NETNS_PREFIX}{marker.name}"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_swapped_directories_and_planted_links_never_redirect_roots_writes(setup):
    """A few hundred starts, each raced by the client: the VM dir (where a run_dir of the client's choosing would
    put it) renamed away and replaced by a link to root's directory, and a link to root's file planted under each
    name root writes in the VM dir the launcher makes. Each start may fail; none may touch the canary."""
    results = attack(setup, "race", machine_json(setup["images"] / "bad"), RACES)
    assert snapshot(setup["canary"]) == setup["before"]
    assert len(results) == RACES
    # Each start got as far as the file steps: QEMU ran (and failed on the kernel), or a planted link refused one
    failed = [r["error"] for r in results if not r["ok"]]
    assert all("QEMU did not start" in error or "File exists" in error for error in failed), failed[:3]
    assert all(Path(r["vm_dir"]).parent == setup["vms"] for r in results if r["ok"])
    # A failed start removes its VM dir, unless the racer planted links again meanwhile: then only those are left
    for vm_dir in setup["vms"].glob("vm-*"):
        assert all(p.is_symlink() and p.lstat().st_uid == CLIENT_UID for p in vm_dir.iterdir()), vm_dir


def test_links_in_a_memory_file_path_are_refused(setup):
    """The one path a client sends (a template's memory file below its run dir) is walked without following
    links: a linked directory or a linked file is refused, and root creates or chowns nothing there."""
    run, canary = setup["run"], setup["canary"]
    (run / "tpl-dir").symlink_to(canary / "dir")
    (run / "tpl-file").mkdir()
    (run / "tpl-file" / "memory").symlink_to(canary / "dir" / "file")
    for uid in (run / "tpl-dir", run / "tpl-file", run / "tpl-file" / "memory"):
        os.lchown(uid, CLIENT_UID, CLIENT_UID)
    for i, memory in enumerate((run / "tpl-dir" / "memory", run / "tpl-file" / "memory")):
        answer = request_as(CLIENT_UID, setup["vm_gid"], setup["socket"], "start", vm_id=f"mem-{i}",
                            machine=machine_json(setup["images"] / "real", memory_file=str(memory)),
                            run_dir=str(run), incoming="defer")
        assert "error" in answer, answer
    assert snapshot(canary) == setup["before"]


def test_image_files_the_client_can_swap_are_never_bound(setup):
    """Image files in a directory the client can write, flipped between a file and a link to root's secret while
    each start runs: the launcher boots only from a store that is root's alone, so it refuses them all, and no
    QEMU ever holds the secret (what is checked is what is bound)."""
    mine = make_image(setup["images"] / "client", setup["images"] / "real", owner=CLIENT_UID)
    (mine / "rootfs.ext4").rename(mine / "real")
    secret = (setup["canary"] / "secret").stat()
    results = attack(setup, "image", machine_json(mine), IMAGE_RACES)
    assert len(results) == IMAGE_RACES
    held = []
    for result in filter(lambda r: r["ok"], results):
        for fd in Path(f"/proc/{result['pid']}/fd").iterdir():
            with contextlib.suppress(OSError):
                info = fd.stat()
                held.append((info.st_dev, info.st_ino))
        RemoteLauncher(setup["socket"]).request("stop", vm_dir=result["vm_dir"])
    assert (secret.st_dev, secret.st_ino) not in held, "a QEMU was given root's secret"
    assert not any(result["ok"] for result in results)
    assert any("not root's alone" in result["error"] for result in results)  # the store check, not luck
    assert snapshot(setup["canary"]) == setup["before"]


def test_the_slot_marker_and_network_record_are_written_by_root_in_roots_directories(setup):
    """One VM (paused: QMP is all a network needs). Links where a client-named directory would hold the slot
    marker and, in the VM dir, under the network record's name: the attach is refused; without the planted link
    it succeeds and its marker is root's, in the launcher's directory. The canary never changes."""
    run = setup["run"]

    def client(op: str, **args) -> dict:
        return request_as(CLIENT_UID, setup["vm_gid"], setup["socket"], op, **args)

    (run / ".netslots").symlink_to(setup["canary"] / "dir")
    os.lchown(run / ".netslots", CLIENT_UID, CLIENT_UID)
    started = client("start", vm_id="net-1", machine=machine_json(setup["images"] / "real"), run_dir=str(run),
                     incoming="defer")
    assert "answer" in started, started
    vm_dir = Path(started["answer"]["vm_dir"])
    resolved = {"egress": "none", "rules": [], "hosts": {}}
    try:
        # bwrap bound the launcher's descriptors and closed them: QEMU holds no directory (a way out of its view)
        held = [os.stat(fd).st_mode for fd in Path(f"/proc/{started['answer']['pid']}/fd").iterdir()]
        assert held and not any(stat.S_ISDIR(mode) for mode in held)
        planted = vm_dir / "network.json"
        link = [*as_uid(CLIENT_UID, setup["vm_gid"]), "ln", "-s", str(setup["canary"] / "dir" / "file"),
                str(planted)]
        subprocess.run(link, check=True, cwd="/")
        refused = client("attach_network", vm_dir=str(vm_dir), resolved=resolved)
        assert "error" in refused, refused
        assert planted.is_symlink()  # root left the client's link alone, and wrote nothing through it
        subprocess.run([*as_uid(CLIENT_UID, setup["vm_gid"]), "rm", str(planted)], check=True, cwd="/")
        attached = client("attach_network", vm_dir=str(vm_dir), resolved=resolved)
        assert "answer" in attached, attached
        marker = setup["vms"] / ".netslots" / str(attached["answer"]["slot"])
        info, parent = marker.lstat(), marker.parent.lstat()
        assert (info.st_uid, parent.st_uid, parent.st_mode & 0o077) == (0, 0, 0)
        assert json.loads(marker.read_text())["vm_dir"] == str(vm_dir)
    finally:
        assert client("stop", vm_dir=str(vm_dir)) == {"answer": {"ok": True}}
    assert not vm_dir.exists()
    assert snapshot(setup["canary"]) == setup["before"]


def test_only_the_apis_uid_is_served_and_a_launcher_must_be_told_which(setup):
    """Another uid in the socket's group is refused every op and starts nothing; a launcher with no
    --allow-user does not start at all (no socket, one line saying why)."""
    for op, args in (("ping", {}), ("start", {"vm_id": "other", "machine": machine_json(setup["images"] / "real")}),
                     ("stop", {"vm_dir": str(setup["vms"] / "vm-net-1")})):
        answer = request_as(OTHER_UID, setup["vm_gid"], setup["socket"], op, **args)
        assert "may not use this launcher" in answer.get("error", ""), answer
    assert not (setup["vms"] / "vm-other").exists()
    spec = setup["root"] / "launcher.toml"
    lonely = setup["root"] / "lonely.toml"
    lonely.write_text(spec.read_text().replace("launcher.sock", "lonely.sock"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    try:
        done = subprocess.run([str(APPLIANCE), "launcher", "--group", "appliance-vm", "--spec", str(lonely)],
                              capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("a launcher with no --allow-user started and served")
    assert done.returncode != 0 and "--allow-user is required" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (setup["root"] / "lonely.sock").exists()
    assert snapshot(setup["canary"]) == setup["before"]
