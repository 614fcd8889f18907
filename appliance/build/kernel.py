"""The guest kernel and busybox: Debian .debs fetched with the private apt (appliance/build/apt.py) and unpacked
without installing them, so the host never installs the guest kernel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.build.apt import Apt
from appliance.build.common import BuildError, atomic_output, exclusive, remove_leftovers, run, sha256_json

_REAL_KERNEL = re.compile(r"^linux-image-\d")


# --- resolving (pure) ------------------------------------------------------------------------------------------


def resolve_kernel_package(requested: str, depends_output: str) -> str:
    """The real linux-image-<abi>-<flavour> package behind a metapackage, from `apt-cache depends` output."""
    if _REAL_KERNEL.match(requested):
        return requested
    for line in depends_output.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        value = value.strip()
        if key.strip() == "Depends" and _REAL_KERNEL.match(value):
            return value
    raise ValueError(f"{requested} depends on no linux-image-<version> package")


def parse_version(show_output: str) -> str:
    """The Version: field of `apt-cache show --no-all-versions` output."""
    for line in show_output.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise ValueError("no Version field in apt-cache show output")


# --- fetching (I/O) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootDebs:
    kernel_package: str
    kernel_version: str
    kernel_deb: Path
    busybox_version: str
    busybox_deb: Path


def fetch_boot_debs(mirror: str, suite: str, kernel_package: str, cache_dir: Path, refresh: bool) -> BootDebs:
    """Resolve and download the kernel and busybox-static .debs; a recorded resolution is reused offline."""
    phase = "kernel: fetch"
    sources = Apt.sources(mirror, suite)
    key = sha256_json({"sources": sources, "kernel": kernel_package})[:16]
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    record = cache_dir / "stages" / f"boot-debs-{key}.json"
    with exclusive(cache_dir / "apt" / f"{key}.lock"):
        if record.exists() and not refresh:
            data = json.loads(record.read_text())
            found = BootDebs(**{k: Path(v) if k.endswith("_deb") else v for k, v in data.items()})
            if found.kernel_deb.exists() and found.busybox_deb.exists():
                return found
        return _resolve_and_download(phase, Apt(cache_dir / "apt" / key, sources), kernel_package, debs, record)


def _resolve_and_download(phase: str, apt: Apt, kernel_package: str, debs: Path, record: Path) -> BootDebs:
    apt(phase, "apt-get", "update")
    try:
        package = resolve_kernel_package(kernel_package, apt(phase, "apt-cache", "depends", kernel_package))
        versions = {name: parse_version(apt(phase, "apt-cache", "show", "--no-all-versions", name))
                    for name in (package, "busybox-static")}
    except ValueError as exc:
        raise BuildError(f"{phase}: {exc}") from None
    remove_leftovers(debs, ".download-*")
    download = debs / f".download-{os.getpid()}"
    paths = {}
    try:
        for name, version in versions.items():
            target = debs / Apt.deb_filename(name, version)
            if not target.exists():
                # apt-get download picks the file's name: into a private directory first, so an interrupted
                # download never looks like a cached .deb.
                download.mkdir(exist_ok=True)
                apt(phase, "apt-get", "download", f"{name}={version}", cwd=download)
                with atomic_output(target) as partial:
                    try:
                        (download / target.name).rename(partial)
                    except FileNotFoundError:
                        raise BuildError(f"{phase}: apt-get download {name}={version} left no {target.name}") from None
            paths[name] = target
    finally:
        shutil.rmtree(download, ignore_errors=True)
    found = BootDebs(package, versions[package], paths[package], versions["busybox-static"], paths["busybox-static"])
    with atomic_output(record) as partial:
        partial.write_text(json.dumps({k: str(v) for k, v in found.__dict__.items()}, indent=1))
    return found


@dataclass(frozen=True)
class KernelTree:
    release: str
    vmlinuz: Path
    modules: Path  # lib/modules/<release>


def extract_kernel(deb: Path, dest: Path) -> KernelTree:
    run("kernel: extract", ["dpkg-deb", "-x", deb, dest])
    releases = sorted(p.name for p in (dest / "lib/modules").iterdir()) if (dest / "lib/modules").is_dir() else []
    if len(releases) != 1:
        raise BuildError(f"kernel: extract: expected one lib/modules/<release> in {deb.name}, found {releases}")
    release = releases[0]
    vmlinuz = dest / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise BuildError(f"kernel: extract: {deb.name} has no boot/vmlinuz-{release}")
    return KernelTree(release, vmlinuz, dest / "lib/modules" / release)


# --- kernel modules (pure) ------------------------------------------------------------------------------------


def module_name(path_or_name: str) -> str:
    """Kernel module names treat '-' and '_' alike: virtio-rng.ko and virtio_rng are the same module."""
    name = path_or_name.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def parse_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a .ko's .modinfo section (an ELF64 little-endian object)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, strtab_offset, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", strtab_offset + name)
        if elf[strtab_offset + name : end] != b".modinfo":
            continue
        for item in elf[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def module_deps(info: Mapping[str, list[str]]) -> list[str]:
    """Hard dependencies plus 'pre:' soft dependencies, as module names."""
    deps = [d for field in info.get("depends", []) for d in field.split(",") if d]
    for softdep in info.get("softdep", []):
        for part in softdep.split("post:")[0].split():
            if part != "pre:":
                deps.append(part)
    return [module_name(dep) for dep in deps]


def load_order(wanted: Iterable[str], deps: Mapping[str, list[str]], builtin: set[str]) -> list[str]:
    """Module names in an order insmod accepts: every module after its dependencies, each once.

    Built-in modules are dropped; a soft dependency that is neither a module nor built in is skipped; a
    wanted module or hard dependency that is unknown raises ValueError.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin or name in order:
            return
        if name not in deps:
            raise ValueError(f"kernel module {name!r} ({' <- '.join(reversed(chain))}) is neither a module "
                             "nor built in")
        if name in visiting:
            raise ValueError(f"kernel module dependency cycle through {name!r}")
        visiting.add(name)
        for dep in deps[name]:
            visit(dep, (*chain, dep))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name), (module_name(name),))
    return order


def builtin_modules(modules_builtin: str) -> set[str]:
    return {module_name(line.strip()) for line in modules_builtin.splitlines() if line.strip()}


def resolve_modules(tree: KernelTree, wanted: list[str]) -> list[Path]:
    """Paths of the wanted modules and their dependencies in load order (reads only the .ko files needed)."""
    paths = {module_name(p.name): p for p in tree.modules.rglob("*.ko*")}
    builtin = builtin_modules((tree.modules / "modules.builtin").read_text())
    deps: dict[str, list[str]] = {}
    pending = [module_name(name) for name in wanted]
    while pending:
        name = pending.pop()
        if name in deps or name not in paths:
            continue
        info = parse_modinfo(paths[name].read_bytes())
        hard = {module_name(d) for f in info.get("depends", []) for d in f.split(",") if d}
        # A soft dependency that is not shipped as a module is optional.
        deps[name] = [d for d in module_deps(info) if d in hard or d in paths]
        pending.extend(deps[name])
    try:
        names = load_order(wanted, deps, builtin)
    except ValueError as exc:
        raise BuildError(f"initramfs: {exc}") from None
    return [paths[name] for name in names]
