"""The guest initramfs: busybox-static, the kernel modules the kernel lacks, and /init, as a newc cpio.

Written by this module rather than by cpio(1), so device nodes need no root and the archive is byte-for-byte
reproducible (fixed owners and times, sorted entries). Left uncompressed: the kernel unpacks a plain cpio
faster than it decompresses one, and QEMU copies it into guest memory directly.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Applets /init uses (plus a few for the appliance.break debug shell); everything else stays inside busybox.
APPLETS = (
    "sh", "mount", "umount", "insmod", "switch_root", "poweroff", "reboot", "mkdir", "cat", "ls",
    "sleep", "usleep", "dmesg", "ip", "echo", "ps", "grep", "lsmod", "free", "df", "stat",
)


@dataclass(frozen=True)
class Entry:
    path: str  # without a leading slash
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """A cpio 'newc' archive; parent directories are added and everything is ordered parents-first."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        path = entry.path.strip("/")
        for parent in list(PurePosixPath(path).parents)[:-1]:
            by_path.setdefault(str(parent), directory(str(parent)))
        by_path[path] = Entry(path, entry.mode, entry.data, entry.rdev)
    out = bytearray()
    records = [by_path[p] for p in sorted(by_path, key=lambda p: p.split("/"))]
    records.append(Entry("TRAILER!!!", 0))
    for ino, entry in enumerate(records, start=1):
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino if entry.mode else 0, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        out += header + name + _pad(len(header) + len(name))
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def initramfs_entries(
    init_script: bytes, busybox: bytes, modules: list[tuple[str, bytes]], release: str
) -> list[Entry]:
    """Everything in the initramfs; `modules` are (name, bytes) in load order, listed in /etc/modules.load."""
    entries = [
        regular("init", init_script, 0o755),
        regular("bin/busybox", busybox, 0o755),
        *(symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
        symlink("sbin", "bin"),
        directory("dev"),
        char_device("dev/console", 5, 1),
        char_device("dev/null", 1, 3, 0o666),
        *(directory(d) for d in ("proc", "sys", "mnt/ro", "mnt/rw", "newroot", "etc")),
    ]
    order = []
    for name, data in modules:
        path = f"lib/modules/{release}/{name}"
        entries.append(regular(path, data))
        order.append(f"/{path}\n")
    entries.append(regular("etc/modules.load", "".join(order).encode()))
    return entries


def build_initramfs(init_script: Path, busybox: Path, modules: list[Path], release: str, out: Path) -> list[str]:
    """Write the initramfs; returns the module names in load order (for the manifest)."""
    mods = [(path.name, path.read_bytes()) for path in modules]
    out.write_bytes(newc_archive(initramfs_entries(init_script.read_bytes(), busybox.read_bytes(), mods, release)))
    return [name for name, _ in mods]
