"""The host image's disk: a GPT layout, the boot loaders and the assembly, all on plain files (no loop devices).

    LBA 0        protective MBR carrying GRUB's boot.img (legacy BIOS)
    p1  1 MiB    BIOS boot partition: GRUB's core.img, found by boot.img through a sector number patched in
    p2 32 MiB    EFI system partition (FAT, filled with mtools): EFI/BOOT/BOOTX64.EFI (UEFI)
    p3 16 MiB    appliance-config (FAT): site.toml, the per-site settings; any computer can edit it
    p4 rest      appliance-root (ext4 made by mkfs.ext4 -d); last, so the node can grow it to its disk

Both GRUB images carry the same small configuration that finds the root file system by UUID and reads
/boot/grub/grub.cfg from it, so the kernel command line lives in one place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from appliance.build.common import BuildError, run

SECTOR = 512
MIB = 1 << 20
GRUB_DIR = Path("/usr/lib/grub")
# GUIDs of the partition types (UEFI spec; Discoverable Partitions Specification for the root).
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # readable by every OS: the site config partition
LINUX_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
CONFIG_LABEL = "appliance-config"
ROOT_LABEL = "appliance-root"
# GRUB modules each image needs: disks and partitions, the file systems, the Linux loader, search by UUID, a serial
# console, and the normal mode that runs the configuration.
GRUB_MODULES_COMMON = ["part_gpt", "part_msdos", "fat", "ext2", "normal", "linux", "echo", "search",
                       "search_fs_uuid", "configfile", "gzio", "test", "serial", "terminal"]
GRUB_MODULES = {"x86_64-efi": [*GRUB_MODULES_COMMON, "all_video", "efi_gop"],
                "i386-pc": [*GRUB_MODULES_COMMON, "biosdisk"]}
# boot.img offsets (grub-core/boot/i386/pc/boot.S): the LBA of core.img, the boot drive, the drive check jump.
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
BOOT_DRIVE_CHECK = 0x66
MBR_CODE_END = 440  # the disk signature and partition table follow: never overwritten
# The blocklist at the end of core.img's first sector (diskboot.S): start LBA, sector count, load segment.
BLOCKLIST = struct.Struct("<QHH")
CORE_LOAD_SEGMENT = 0x820


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    type_guid: str
    start: int  # sectors
    size: int  # sectors

    @property
    def offset(self) -> int:
        return self.start * SECTOR


@dataclass(frozen=True)
class Layout:
    partitions: tuple[Partition, ...]
    total_bytes: int

    def by_name(self, name: str) -> Partition:
        return next(p for p in self.partitions if p.name == name)


def plan_layout(root_bytes: int, esp_mib: int = 32, config_mib: int = 16) -> Layout:
    """Partitions aligned to 1 MiB; the disk ends 1 MiB after the root (room for the backup GPT)."""
    mib = MIB // SECTOR
    sizes = [("bios-boot", BIOS_BOOT, 1 * mib), ("EFI system", ESP, esp_mib * mib),
             (CONFIG_LABEL, BASIC_DATA, config_mib * mib),
             (ROOT_LABEL, LINUX_ROOT_X86_64, -(-root_bytes // MIB) * mib)]
    start, parts = mib, []
    for number, (name, guid, size) in enumerate(sizes, 1):
        parts.append(Partition(number, name, guid, start, size))
        start += size
    return Layout(tuple(parts), (start + mib) * SECTOR)


def sfdisk_script(layout: Layout) -> str:
    lines = ["label: gpt", "unit: sectors", "first-lba: 2048", ""]
    lines += [f'{p.number} : start={p.start}, size={p.size}, type={p.type_guid}, name="{p.name}"'
              for p in layout.partitions]
    return "\n".join(lines) + "\n"


def early_config(root_uuid: str) -> str:
    """Built into both GRUB images: find the root file system, then read its grub.cfg."""
    return (f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            "set prefix=($root)/boot/grub\n"
            "configfile ($root)/boot/grub/grub.cfg\n")


def grub_cfg(root_uuid: str, kernel: str, initrd: str, cmdline: str) -> str:
    """/boot/grub/grub.cfg in the root file system: one entry, on the screen and the first serial port."""
    return (
        "# Written by `appliance build host`.\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input console serial\n"
        "terminal_output console serial\n"
        "set timeout=1\n"
        "set default=0\n"
        'menuentry "appliance node" {\n'
        f"  search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"  linux /{kernel} root=UUID={root_uuid} ro {cmdline}\n"
        f"  initrd /{initrd}\n"
        "}\n"
    )


def patch_boot_sector(mbr: bytes, boot_img: bytes, core_lba: int) -> bytes:
    """The first sector: boot.img's code, pointing at core.img, over the protective MBR's signature and table."""
    if len(mbr) != SECTOR or len(boot_img) != SECTOR:
        raise ValueError("the MBR and boot.img are one 512-byte sector each")
    code = bytearray(boot_img[:MBR_CODE_END])
    struct.pack_into("<Q", code, BOOT_KERNEL_SECTOR, core_lba)
    code[BOOT_DRIVE] = 0xFF  # boot from the drive the BIOS booted
    code[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"  # BIOSes that pass a wrong drive number: use 0x80
    return bytes(code) + mbr[MBR_CODE_END:]


def patch_core_image(core: bytes, core_lba: int) -> bytes:
    """core.img padded to whole sectors, its first sector's blocklist naming where the rest lies (right after)."""
    padded = bytearray(core + b"\0" * (-len(core) % SECTOR))
    sectors = len(padded) // SECTOR
    first = SECTOR - BLOCKLIST.size
    BLOCKLIST.pack_into(padded, first, core_lba + 1, sectors - 1, CORE_LOAD_SEGMENT)
    BLOCKLIST.pack_into(padded, first - BLOCKLIST.size, 0, 0, 0)  # the list ends there
    return bytes(padded)


# --- I/O --------------------------------------------------------------------------------------------------------


def grub_mkimage(target: str, output: Path, config: Path) -> None:
    if not (GRUB_DIR / target / "linux.mod").exists():
        package = "grub-efi-amd64-bin" if target == "x86_64-efi" else "grub-pc-bin"
        raise BuildError(f"disk: no GRUB modules for {target} in {GRUB_DIR}; install the Debian package {package}")
    run("disk: grub-mkimage", ["grub-mkimage", "--directory", GRUB_DIR / target, "--format", target,
                               "--output", output, "--prefix", "/boot/grub", "--config", config,
                               *GRUB_MODULES[target]])


def make_fat(image: Path, size_mib: int, label: str, files: dict[str, Path]) -> None:
    """A FAT file system image holding `files` (path inside -> source), made and filled without mounting."""
    image.unlink(missing_ok=True)
    run("disk: mkfs.vfat", ["mkfs.vfat", "-C", "-n", label[:11].upper(), image, str(size_mib * 1024)])
    made: set[str] = set()
    for inside, source in sorted(files.items()):
        parts = inside.strip("/").split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                run("disk: mmd", ["mmd", "-i", image, f"::/{directory}"])
                made.add(directory)
        run("disk: mcopy", ["mcopy", "-o", "-i", image, source, f"::/{'/'.join(parts)}"])


def copy_sparse(source: Path, disk: Path, offset: int, chunk: int = MIB) -> None:
    """Write source into disk at offset, skipping all-zero chunks (the disk file stays sparse)."""
    zero = bytes(chunk)
    with source.open("rb") as src, disk.open("r+b") as dst:
        position = offset
        while block := src.read(chunk):
            if block != zero[: len(block)]:
                dst.seek(position)
                dst.write(block)
            position += len(block)


def assemble(disk: Path, layout: Layout, images: dict[str, Path], boot_img: Path, core_img: Path) -> None:
    """Partition the file, copy each partition image in, install the BIOS boot code."""
    disk.unlink(missing_ok=True)
    with disk.open("wb") as stream:
        stream.truncate(layout.total_bytes)
    run_sfdisk(disk, sfdisk_script(layout))
    for name, image in images.items():
        part = layout.by_name(name)
        if image.stat().st_size > part.size * SECTOR:
            raise BuildError(f"disk: {image.name} ({image.stat().st_size} bytes) does not fit partition {name}")
        copy_sparse(image, disk, part.offset)
    bios = layout.by_name("bios-boot")
    core = patch_core_image(core_img.read_bytes(), bios.start)
    if len(core) > bios.size * SECTOR:
        raise BuildError(f"disk: GRUB's core.img ({len(core)} bytes) does not fit the BIOS boot partition")
    with disk.open("r+b") as stream:
        mbr = stream.read(SECTOR)
        stream.seek(0)
        stream.write(patch_boot_sector(mbr, boot_img.read_bytes(), bios.start))
        stream.seek(bios.offset)
        stream.write(core)


def run_sfdisk(disk: Path, script: str) -> None:
    import subprocess

    result = subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], input=script,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"disk: sfdisk exited with {result.returncode}: {result.stderr.strip()[-300:]}")
