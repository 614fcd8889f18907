"""Boot a built host image as a VM (QEMU, TCG here) on UEFI (OVMF) or legacy BIOS (SeaBIOS), for tests and bench.

Networking is QEMU's user mode with SSH and the API forwarded to 127.0.0.1 only; the console goes to a file. The
disk is a sparse copy of the image with a site.toml written into its config partition by mtools (what an operator
does without mounting anything) and made larger than the image, so the node has a root file system to grow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from appliance.build.host import disk as disk_mod

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARES = ("uefi", "bios")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_partition_offset(image: Path) -> int:
    """Byte offset of the appliance-config partition, read from the image's GPT with sfdisk."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    for part in table["partitions"]:
        if part.get("name") == disk_mod.CONFIG_LABEL:
            return part["start"] * table.get("sectorsize", 512)
    raise LookupError(f"{image} has no {disk_mod.CONFIG_LABEL} partition")


def prepare_disk(image: Path, target: Path, site_toml: str | None, grow_bytes: int = 2 << 30) -> Path:
    """A sparse copy of the image, with this site.toml on its config partition (None: no site.toml at all)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(target)], check=True)
    offset = config_partition_offset(target)
    if site_toml is not None:
        source = target.with_suffix(".site.toml")
        source.write_text(site_toml)
        subprocess.run(["mcopy", "-o", "-i", f"{target}@@{offset}", str(source), "::/site.toml"], check=True)
    with target.open("r+b") as stream:
        stream.truncate(target.stat().st_size + grow_bytes)
    return target


@dataclass
class NodeVM:
    """One QEMU process booting the disk; `stop()` ends it (by its PID) and is safe to call twice."""

    disk: Path
    firmware: str
    workdir: Path
    memory_mib: int = 3072
    # Offer the node SVM/VMX, so its engine may find (nested, emulated) KVM. Off for tests: since QEMU 10 the
    # outer TCG's emulated SVM passes the node's probe but its sandboxes then hang in boot, and a node without
    # /dev/kvm chooses TCG at once (the in-node sandbox test then skips: TCG in TCG is too slow here).
    nested_virt: bool = False
    ssh_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def command(self) -> list[str]:
        net = (f"user,id=n0,restrict=off,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
               f"hostfwd=tcp:127.0.0.1:{self.api_port}-:8080")
        argv = ["qemu-system-x86_64", "-name", f"node-{self.firmware}", "-accel", "tcg,tb-size=256",
                "-cpu", "max" if self.nested_virt else "max,svm=off,vmx=off",
                "-smp", "2", "-m", str(self.memory_mib), "-nodefaults", "-display", "none",
                "-serial", f"file:{self.console}", "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
                "-drive", f"file={self.disk},format=raw,if=none,id=d0,cache=unsafe",
                "-device", "virtio-blk-pci,drive=d0", "-device", "virtio-rng-pci"]
        if self.firmware == "uefi":
            vars_copy = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            argv += ["-machine", "q35",
                     "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        else:
            argv += ["-machine", "pc"]  # SeaBIOS, QEMU's default firmware
        return argv

    def start(self) -> NodeVM:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        log = (self.workdir / "qemu.log").open("w")
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def wait_console(self, needle: str, deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            text = self.console_text()
            if needle in text:
                return text
            if not self.alive():
                raise RuntimeError(f"QEMU ended before the console said {needle!r}: {self.tail()}")
            time.sleep(1)
        raise TimeoutError(f"the console did not say {needle!r} within {deadline_s:.0f}s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return " | ".join(self.console_text().splitlines()[-lines:])

    def wait_http(self, path: str, deadline_s: float, status: int = 200) -> float:
        """Seconds since power-on when GET path on the forwarded API port answered `status`."""
        url = f"http://127.0.0.1:{self.api_port}{path}"
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == status:
                        return time.monotonic() - self.started
            except urllib.error.HTTPError as exc:
                if exc.code == status:
                    return time.monotonic() - self.started
            except OSError:
                pass
            if not self.alive():
                raise RuntimeError(f"QEMU ended while waiting for {path}: {self.tail()}")
            time.sleep(2)
        raise TimeoutError(f"{path} did not answer {status} within {deadline_s:.0f}s: {self.tail()}")

    def ssh_argv(self, key: Path, command: str) -> list[str]:
        return ["ssh", "-i", str(key), "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-o", "BatchMode=yes", "root@127.0.0.1", command]

    def ssh(self, key: Path, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(key, command), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def wait_ssh(self, key: Path, deadline_s: float) -> float:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh(key, "true", timeout=30).returncode == 0:
                    return time.monotonic() - self.started
            if not self.alive():
                raise RuntimeError(f"QEMU ended while waiting for SSH: {self.tail()}")
            time.sleep(2)
        raise TimeoutError(f"SSH did not answer within {deadline_s:.0f}s: {self.tail()}")


# Run on the node: stop the API, end the sandbox QEMUs it left running (by PID; on a test node every QEMU is a
# sandbox's, whether the API or the VMM launcher started it), forget the accelerator verdict of this boot, start the
# API again so the engine probes KVM once more.
_REPROBE = r"""
systemctl stop appliance-api.service
for d in /proc/[0-9]*; do
  if tr '\0' ' ' < "$d/cmdline" 2>/dev/null | grep -q '^qemu-system'; then
    kill -9 "${d#/proc/}"
  fi
done
rm -f /dev/shm/appliance-accelerator-*.json
systemctl start appliance-api.service
"""


def node_accelerators(vm: NodeVM, key: Path, more_than: int = 0, deadline_s: float = 300) -> list[str]:
    """Every accelerator the node's API chose this boot ("kvm" or "tcg"), once there are more than `more_than`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        lines = vm.ssh(key, "journalctl --boot --unit appliance-api --no-pager --output cat "
                            "| grep 'accelerator: '").stdout.splitlines()
        if len(lines) > more_than:
            return [line.split("accelerator: ", 1)[1].split()[0] for line in lines]
        time.sleep(3)
    raise TimeoutError(f"the node's API chose no new accelerator within {deadline_s:.0f}s")


class NestedKvmUnusable(RuntimeError):
    """The node chose TCG for its sandboxes (correctly, where nested KVM does not boot)."""


def ensure_nested_kvm(vm: NodeVM, key: Path, attempts: int = 3) -> int:
    """Make the node's sandboxes run under (nested) KVM; returns how many probes it took.

    The node is a TCG guest whose CPU model offers SVM; QEMU's emulation of it is not perfect, and now and then
    the node's probe guest fails to boot under it (1 boot in 4 or so here), after which the engine rightly falls
    back to TCG. TCG inside TCG takes tens of minutes for a sandbox: too slow for a test, so the probe is retried.
    """
    choices = node_accelerators(vm, key)
    for attempt in range(1, attempts + 1):
        if choices[-1] == "kvm":
            return attempt
        vm.ssh(key, _REPROBE, timeout=120)
        vm.wait_http("/v1/healthz", 300)
        choices = node_accelerators(vm, key, more_than=len(choices))
    # Not a product failure: the node fell back to TCG as it should. Since QEMU 10 (the outer TCG's emulated SVM)
    # the nested probe guest has not booted here, and TCG inside TCG takes tens of minutes for a sandbox.
    raise NestedKvmUnusable(f"the node's engine found nested KVM unusable {attempts} times and chose TCG (see its "
                            "journal); a sandbox under TCG inside TCG is too slow to test here")


def site_toml(public_key: str, pool_size: int = 0, extra: str = "") -> str:
    """A site config for a test node: SSH by this key, the API open to QEMU's user-mode gateway (10.0.2.2).

    The accelerator stays "auto": the node VM's CPU model (-cpu max) offers SVM, so the node's engine finds KVM
    (nested, emulated by the outer TCG) usable, which runs sandboxes far faster than TCG inside TCG; the probe boot
    that decides it gets 120 s instead of 10, since this machine is shared and the node itself is emulated.
    """
    return (f'[ssh]\nauthorized_keys = ["{public_key.strip()}"]\n\n'
            '[api]\nallowed_networks = ["10.0.2.2/32"]\n\n'
            f"[sandboxes]\npool_size = {pool_size}\nboot_timeout_s = 600\nexec_timeout_s = 600\n"
            f"kvm_probe_timeout_s = 120\n{extra}")
