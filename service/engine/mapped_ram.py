"""QEMU's mapped-ram migration files: RAM at fixed file offsets, so a VM can map a saved state instead of loading it.

A mapped-ram file (QEMU >= 9, docs/devel/migration/mapped-ram.rst) is an ordinary migration stream in which each
RAM block's pages sit at a fixed, 1 MiB-aligned offset (`pages_offset`), zero pages left as holes, with a bitmap
of the pages written. Its guest RAM is thus, byte for byte, the region [pages_offset, pages_offset + size) of the
file. A copy maps that region copy-on-write (memory-backend-file offset=, readonly=on, share=off) and loads the
stream from a "device file": the same file with that block's pages cut out and its bitmap cleared, so the load
restores every device and copies no RAM. The copies share the file's pages until they write them.

The file is treated as untrusted input: only its first bytes are parsed, and every offset is checked.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct(">IQQQ")  # MappedRamHeader: version, page_size, bitmap_offset, pages_offset (big-endian)
_HEADER_VERSION, _PAGE = 1, 4096
_ALIGN = 1 << 20  # MAPPED_RAM_FILE_OFFSET_ALIGNMENT
_SCAN = 64 << 10  # the RAM section's block list comes right after the stream's short preamble
RAM_BLOCK = b"ram"  # the id of the VM's memory backend (machine.py): its RAM block's name


class MappedRamError(ValueError):
    pass


@dataclass(frozen=True)
class RamLayout:
    """Where the guest RAM block lives in a mapped-ram file."""

    bitmap_offset: int
    bitmap_size: int
    pages_offset: int
    size: int


def ram_layout(path: Path, size: int) -> RamLayout:
    """The RAM block of `size` bytes in the mapped-ram file at `path`: found as its block record (name, length)
    followed by a header consistent with its own position; every offset checked against the file."""
    with open(path, "rb") as handle:
        head = handle.read(_SCAN)
        file_size = os.fstat(handle.fileno()).st_size
    record = bytes([len(RAM_BLOCK)]) + RAM_BLOCK + struct.pack(">Q", size)
    start = 0
    while (found := head.find(record, start)) >= 0:
        start = found + 1
        at = found + len(record)
        if at + _HEADER.size > len(head):
            break
        version, page, bitmap_offset, pages_offset = _HEADER.unpack_from(head, at)
        pages = size // _PAGE
        bitmap_size = (pages + 63) // 64 * 8
        if (version == _HEADER_VERSION and page == _PAGE and bitmap_offset == at + _HEADER.size
                and pages_offset % _ALIGN == 0 and pages_offset >= bitmap_offset + bitmap_size
                and pages_offset + size <= file_size):
            return RamLayout(bitmap_offset, bitmap_size, pages_offset, size)
    raise MappedRamError(f"{path.name} is not a mapped-ram state with a {size >> 20} MiB RAM block")


def write_device_file(source: Path, target: Path, layout: RamLayout) -> None:
    """`source` without the RAM block's pages (a hole) and with its bitmap cleared: loading it restores the
    devices and leaves RAM as mapped. Sparse: only the few data extents outside the pages are copied."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            skip = (layout.pages_offset, layout.pages_offset + layout.size)
            for begin, end in extents(src, size):
                for piece in ((begin, min(end, skip[0])), (max(begin, skip[1]), end)):
                    if piece[0] < piece[1]:
                        _copy(src, dst, *piece)
            os.pwrite(dst, bytes(layout.bitmap_size), layout.bitmap_offset)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents [begin, end) of a sparse file, from SEEK_DATA/SEEK_HOLE (which read no page)."""
    found, offset = [], 0
    while offset < size:
        try:
            begin = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past offset
            break
        end = os.lseek(fd, begin, os.SEEK_HOLE)
        found.append((begin, end))
        offset = end
    return found


def _copy(src: int, dst: int, begin: int, end: int) -> None:
    while begin < end:
        done = os.copy_file_range(src, dst, end - begin, begin, begin)
        if done <= 0:
            raise OSError(f"short copy at {begin}")
        begin += done
