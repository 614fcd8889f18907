"""Throw-away Debian 12 test hosts: systemd-nspawn containers booted from a cached mmdebstrap rootfs.

Each host is an overlayfs over one extracted template, booted with `systemd-nspawn -b --network-veth`, and reached by
SSH over its veth link. The host gets one address on that link and **no default route**: whatever we install on it
must come from the bundle, which is how the tests prove an install is offline. A blackhole route for the whole test
range on the control machine makes sure that, should a veth vanish, packets for a test address are dropped here
instead of following this machine's default route.

Used by the Molecule create/destroy playbooks (`python -m tests.provisioning.testhost create NAME ...`) and by pytest
fixtures (import). Needs root (mounts, network devices), systemd-container and mmdebstrap.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a plain Debian 12 server has; everything the appliance needs beyond this comes from the bundle.
TEMPLATE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "sudo", "iproute2"]
TEST_USER = "tester"
# 10.199.<index>.0/30: .1 on the control machine's end of the veth, .2 in the container; nothing else is routed there.
NET_PREFIX = "10.199"
NET_RANGE = f"{NET_PREFIX}.0.0/16"
MAX_HOSTS = 250
SSH_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "appliance" / "testhost"


def hosts_dir() -> Path:
    """Per-host overlay dirs and state files; a real disk (an overlay upper dir cannot live on overlayfs)."""
    return Path(os.environ.get("APPLIANCE_TESTHOST_DIR", "/var/tmp/appliance-testhosts"))


@dataclass
class Host:
    name: str
    index: int
    pid: int
    address: str
    root: str  # the overlay mount nspawn boots from
    log: str

    @property
    def veth(self) -> str:
        return veth_name(self.name)


class TestHostError(Exception):
    pass


def veth_name(machine: str) -> str:
    if len(machine) > 11:
        raise TestHostError(f"machine name {machine!r} is longer than 11 characters (the veth is 've-' + name)")
    return f"ve-{machine}"


def _run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kwargs)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the template -------------------------------------------------------------------------------------------------


def template_key() -> str:
    recipe = json.dumps([SUITE, MIRROR, TEMPLATE_PACKAGES, TEST_USER, _CUSTOMIZE], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


# Runs inside the new rootfs ("$1") at build time. Only the bundle's repository may be configured on a test host, so
# the template keeps no apt sources and no package lists.
_CUSTOMIZE = f"""
set -e
chroot "$1" useradd --create-home --shell /bin/bash {TEST_USER}
echo '{TEST_USER} ALL=(ALL) NOPASSWD:ALL' > "$1/etc/sudoers.d/{TEST_USER}"
chmod 0440 "$1/etc/sudoers.d/{TEST_USER}"
chroot "$1" systemctl enable systemd-networkd.service ssh.service
chroot "$1" systemctl mask getty@.service console-getty.service systemd-timesyncd.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer
rm -f "$1/etc/apt/sources.list" "$1"/etc/apt/sources.list.d/*
rm -rf "$1"/var/lib/apt/lists/*
echo 'UseDNS no' > "$1/etc/ssh/sshd_config.d/test-host.conf"
"""


def ensure_template() -> Path:
    """The extracted rootfs all test hosts share (read-only lower dir); built once, then cached."""
    root = cache_dir() / f"rootfs-{template_key()}"
    with _locked(cache_dir() / "template.lock"):
        if (root / "etc" / "os-release").exists():
            return root
        building = root.with_name(root.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        _run(
            "mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(TEMPLATE_PACKAGES)}",
            f"--customize-hook={_CUSTOMIZE}", SUITE, str(building), MIRROR,
        )
        building.rename(root)
    return root


# --- hosts ----------------------------------------------------------------------------------------------------------


def _state_file(name: str) -> Path:
    return hosts_dir() / f"{name}.json"


def load(name: str) -> Host | None:
    try:
        return Host(**json.loads(_state_file(name).read_text()))
    except FileNotFoundError:
        return None


def _hosts() -> list[Host]:
    return [Host(**json.loads(p.read_text())) for p in sorted(hosts_dir().glob("*.json"))]


def _free_index() -> int:
    used = {host.index for host in _hosts()}
    for index in range(1, MAX_HOSTS):
        if index not in used:
            return index
    raise TestHostError(f"more than {MAX_HOSTS} test hosts exist; destroy some (see {hosts_dir()})")


def _ensure_blackhole() -> None:
    routes = _run("ip", "route", "show", "type", "blackhole", NET_RANGE).stdout
    if not routes.strip():
        _run("ip", "route", "add", "blackhole", NET_RANGE)


def _remove_blackhole_if_unused() -> None:
    if not _hosts():
        _run("ip", "route", "del", "blackhole", NET_RANGE, check=False)


def _prepare_root(root: Path, name: str, address: str, pubkey: str) -> None:
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    # No Gateway=: the only network this host has is the link to the control machine.
    (network / "10-host0.network").write_text(
        f"[Match]\nName=host0\n\n[Network]\nAddress={address}/30\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )
    # nspawn's --resolv-conf=off leaves no resolver; sudo resolves its own hostname and would wait 20 s without this.
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost\n")
    (root / "etc/hostname").write_text(f"{name}\n")
    ssh_dir = root / "home" / TEST_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pubkey.strip() + "\n")
    owner = _run("chroot", str(root), "id", "-u", TEST_USER).stdout.strip()
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, int(owner), int(owner))
    (ssh_dir / "authorized_keys").chmod(0o600)


def _wait_for(predicate, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = "; last console lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise TestHostError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as conn:
            conn.settimeout(2)
            return conn.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def create(name: str, pubkey: str, bind_kvm: bool = True) -> Host:
    """Boot a fresh host and return once its SSH server answers on the veth link."""
    veth = veth_name(name)
    if shutil.which("systemd-nspawn") is None:
        raise TestHostError("systemd-nspawn is missing: apt-get install systemd-container")
    template = ensure_template()
    if load(name) is not None:
        destroy(name)
    with _locked(hosts_dir() / "hosts.lock"):
        index = _free_index()
        address = f"{NET_PREFIX}.{index}.2"
        base = hosts_dir() / name
        shutil.rmtree(base, ignore_errors=True)
        upper, work, merged = base / "upper", base / "work", base / "root"
        for path in (upper, work, merged):
            path.mkdir(parents=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={template},upperdir={upper},workdir={work}", str(merged))
        log = base / "console.log"
        host = Host(name=name, index=index, pid=0, address=address, root=str(merged), log=str(log))
        _state_file(name).write_text(json.dumps(asdict(host)))  # from here on, destroy() can clean up
        _ensure_blackhole()
    try:
        _prepare_root(merged, name, address, pubkey)
        argv = [
            "systemd-nspawn", "--boot", f"--directory={merged}", f"--machine={name}", "--network-veth",
            "--register=no", "--keep-unit", "--resolv-conf=off", "--link-journal=no", "--console=passive",
        ]
        if bind_kvm and Path("/dev/kvm").exists():
            argv.append("--bind=/dev/kvm")
        with open(log, "wb") as console:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        host.pid = process.pid
        _state_file(name).write_text(json.dumps(asdict(host)))
        _wait_for(lambda: Path(f"/sys/class/net/{veth}").exists() or process.poll() is not None, 30,
                  f"{veth} to appear", Path(log))
        if process.poll() is not None:
            raise TestHostError(f"systemd-nspawn for {name} exited with {process.returncode}: see {log}")
        _run("ip", "addr", "add", f"{NET_PREFIX}.{index}.1/30", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        _wait_for(lambda: _ssh_banner(address), SSH_TIMEOUT_S, f"SSH on {name} ({address})", Path(log))
    except BaseException:
        destroy(name)
        raise
    return host


def _alive(pid: int) -> bool:
    """Running and not a zombie (nspawn outlives the command that started it; its reaper may be slow or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def destroy(name: str) -> None:
    """Stop the container (poweroff, then kill), unmount its overlay, delete its files. Safe to call twice."""
    host = load(name)
    base = hosts_dir() / name
    if host is not None and host.pid > 0 and _alive(host.pid):
        os.kill(host.pid, signal.SIGTERM)  # nspawn asks the container's systemd to power off
        deadline = time.monotonic() + 15
        while _alive(host.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(host.pid, os.WNOHANG)
            time.sleep(0.1)
        if _alive(host.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60  # a hang deadline: SIGKILL ends it at once
            while _alive(host.pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(host.pid, os.WNOHANG)
                time.sleep(0.05)
    merged = base / "root"
    if merged.is_mount() and _run("umount", str(merged), check=False).returncode != 0:
        _run("umount", "--lazy", str(merged), check=False)
    shutil.rmtree(base, ignore_errors=True)
    with _locked(hosts_dir() / "hosts.lock"):
        _state_file(name).unlink(missing_ok=True)
        _remove_blackhole_if_unused()


def ssh_argv(host: Host, key: Path) -> list[str]:
    return [
        "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{TEST_USER}@{host.address}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testhost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("template", help="build (or find) the cached rootfs template and print its path")
    make = sub.add_parser("create", help="boot a host; prints its state as JSON")
    make.add_argument("name")
    make.add_argument("--pubkey-file", required=True, type=Path)
    make.add_argument("--no-kvm", action="store_true", help="do not pass /dev/kvm into the container")
    drop = sub.add_parser("destroy", help="stop and delete a host")
    drop.add_argument("name")
    sub.add_parser("list", help="print every host this machine has")
    args = parser.parse_args(argv)
    try:
        if args.command == "template":
            print(ensure_template())
        elif args.command == "create":
            host = create(args.name, args.pubkey_file.read_text(), bind_kvm=not args.no_kvm)
            print(json.dumps(asdict(host)))
        elif args.command == "destroy":
            destroy(args.name)
        elif args.command == "list":
            for host in _hosts():
                print(json.dumps(asdict(host)))
    except (TestHostError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else ""
        print(f"testhost: {exc}{': ' + detail if detail else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
