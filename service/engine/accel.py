"""Choosing the accelerator: KVM where it really works, TCG otherwise, and always saying which and why.

/dev/kvm existing is not enough: on nested hypervisors (e.g. a PVM host) KVM opens fine but stock guest kernels
hang in early boot. So "auto" means: the device must answer the KVM API, and then a real probe boot of our guest
must reach the agent within a deadline. The verdict is cached per host boot and kernel image, so only the first
sandbox on a host pays for the probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


@dataclass(frozen=True)
class AcceleratorChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def kvm_device_problem(device: Path = KVM_DEVICE) -> str | None:
    """None if the KVM device answers the API, else why not (in words an operator can act on)."""
    if not device.exists():
        return f"{device} does not exist (no hardware virtualization, or the kvm module is not loaded)"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return f"{device} is not accessible to this user (add the user to the 'kvm' group)"
    except OSError as exc:
        return f"{device} cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{device} does not answer the KVM API: {exc.strerror}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"{device} speaks KVM API {version}, expected {_KVM_API_VERSION}"
    return None


def choose_accelerator(
    requested: str,
    device_problem: Callable[[], str | None],
    probe_boot: Callable[[], str | None],
) -> AcceleratorChoice:
    """Pure decision. `probe_boot` returns None if a KVM guest reached the agent in time, else the failure."""
    if requested == "tcg":
        return AcceleratorChoice("tcg", "TCG requested in the spec (software emulation, ~10-30x slower)")
    problem = device_problem()
    if problem is None:
        problem = probe_boot()
    if problem is None:
        return AcceleratorChoice("kvm", "KVM usable: a probe guest booted to the agent")
    if requested == "kvm":
        raise AcceleratorUnavailable(f"KVM was requested but is not usable: {problem}")
    return AcceleratorChoice("tcg", f"KVM not usable ({problem}); falling back to TCG software emulation")


class AcceleratorUnavailable(RuntimeError):
    pass


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def verdict_cache_file(run_dir: Path) -> Path:
    """Host-wide (one probe per host boot, whatever the run dir): tmpfs, per user; the run dir where there is none."""
    shm = Path("/dev/shm")
    return shm / f"appliance-accelerator-{os.getuid()}.json" if shm.is_dir() else run_dir / "accelerator.json"


def cached_choice(cache_file: Path, key: str, decide: Callable[[], AcceleratorChoice]) -> AcceleratorChoice:
    """Reuse a verdict made earlier in this host boot for the same key (kernel image); else decide and store."""
    full_key = f"{_boot_id()}:{key}"
    stored = _read_own(cache_file)
    if stored is not None and stored.get("key") == full_key and stored.get("name") in ("kvm", "tcg"):
        return AcceleratorChoice(stored["name"], str(stored.get("reason", "")))
    choice = decide()
    with contextlib.suppress(OSError):  # a cache we cannot write (another user's file in its place) costs a probe
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"key": full_key, **asdict(choice)}))
        try:
            tmp.replace(cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    return choice


def _read_own(path: Path) -> dict | None:
    """The cache's content, only if it is a small regular file of this user that nobody else may write: it lives
    in a world-writable tmpfs, where anyone could plant one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        try:
            stored = json.loads(handle.read(4096))
        except ValueError:
            return None
    return stored if isinstance(stored, dict) else None


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host TSC frequency in kHz, which a TCG guest's TSC runs at. None if unknown."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    if cpuinfo is None:
        try:
            return int(sysfs.read_text())
        except (OSError, ValueError):
            pass
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    # The nominal frequency in the model name ("@ 2.60GHz") is the TSC rate on Intel; "cpu MHz" may be the
    # current (scaled) clock on bare metal, so it is only the fallback.
    nominal = re.search(r"^model name\s*:.*@\s*([0-9.]+)\s*GHz", cpuinfo, re.MULTILINE)
    if nominal:
        return int(float(nominal.group(1)) * 1_000_000)
    current = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    if current:
        return int(float(current.group(1)) * 1000)
    return None
