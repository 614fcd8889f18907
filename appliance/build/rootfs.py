"""The guest root filesystem: mmdebstrap base (cached), pinned wheels (cached), agent, trim, ext4 image."""

from __future__ import annotations

import email.parser
import fnmatch
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance_agent.protocol import CODE_USER_ID

from appliance.build.common import (
    BuildError,
    atomic_output,
    exclusive,
    parse_list,
    remove_leftovers,
    run,
    sha256_json,
)

SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# What each supported suite's python3 and libc are: the wheels must match them.
SUITES = {"bookworm": {"python": "3.11", "glibc": (2, 36)}}
# Environment a build passes on to pip: how to reach an index, never what to pick (constraints, find-links).
PIP_ENV_KEEP = frozenset({
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY",
    "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_DISABLE_PIP_VERSION_CHECK",
})
_SAFE_GLOB = re.compile(r"^[A-Za-z0-9_.*?/\[\]-]+$")


# --- pure helpers ------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: scikit_learn, Scikit-Learn and scikit.learn are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(pins: Iterable[str]) -> dict[str, str]:
    return {canonical_name(name): version for name, version in (pin.split("==", 1) for pin in pins)}


def manylinux_platforms(glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a libc of this version runs, newest first.

    pip does not expand `--platform manylinux_2_36_x86_64` to the older tags itself, and current numpy/scipy
    ship only manylinux_2_27/2_28 wheels, so manylinux2014 alone is not enough.
    """
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def wheel_target_args(platforms: list[str], python: str) -> list[str]:
    abi = "cp" + python.replace(".", "")
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python, "--abi", abi]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def pip_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The host environment for pip without its config files or PIP_* settings that change what is picked."""
    env = {k: v for k, v in environ.items() if not k.startswith("PIP_") or k in PIP_ENV_KEEP}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INPUT"] = "1"
    return env


def parse_metadata(text: str) -> tuple[str, str]:
    message = email.parser.Parser().parsestr(text, headersonly=True)
    return message["Name"], message["Version"]


def check_pins(pins: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """Problems (one line each) where the installed versions differ from the pinned ones."""
    problems = []
    for name, version in sorted(pins.items()):
        got = installed.get(name)
        if got is None:
            problems.append(f"{name} is not installed (wanted {version})")
        elif got != version:
            problems.append(f"{name} {got} is installed, the spec pins {version}")
    return problems


def top_level_packages(record: str) -> list[str]:
    """Importable packages a wheel installed, from its RECORD (directories with an __init__.py)."""
    names = set()
    for line in record.splitlines():
        parts = line.split(",", 1)[0].split("/")
        if len(parts) == 2 and parts[1] == "__init__.py" and parts[0].isidentifier():
            names.add(parts[0])
    return sorted(names)


DPKG_QUERY_FORMAT = "${Package}\t${Version}\t${Pre-Depends}, ${Depends}\n"


def parse_dpkg_query(text: str) -> dict[str, str]:
    """name -> version from `dpkg-query -W -f DPKG_QUERY_FORMAT`."""
    packages = {}
    for line in text.splitlines():
        name, _, rest = line.partition("\t")
        version = rest.split("\t", 1)[0]
        if name and version:
            packages[name] = version
    return packages


def parse_dpkg_depends(text: str) -> dict[str, list[str]]:
    """name -> names it depends on (every alternative, without versions or :any) from the same output."""
    depends = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        names = []
        for alternative in re.split(r"[,|]", fields[2]):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            if name:
                names.append(name)
        depends[fields[0]] = names
    return depends


def dependency_closure(roots: Iterable[str], depends: Mapping[str, list[str]]) -> set[str]:
    """The roots and everything they need, recursively."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(depends.get(name, []))
    return seen


def packages_to_purge(installed: Iterable[str], patterns: Iterable[str], keep: set[str]) -> list[str]:
    """Installed packages that match a trim pattern, except those to keep (what the spec asked for and needs)."""
    patterns = list(patterns)
    return sorted(p for p in installed if p not in keep and any(fnmatch.fnmatchcase(p, pat) for pat in patterns))


def mmdebstrap_args(suite: str, sources: list[str], packages: list[str], dpkg_options: list[str],
                    out: Path) -> list[str]:
    args = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--aptopt=Acquire::Languages none"]
    args += [f"--dpkgopt={option}" for option in dpkg_options]
    if packages:
        args.append("--include=" + ",".join(packages))
    return [*args, suite, str(out), *sources]


def ext4_geometry(data_bytes: int, inodes: int) -> tuple[int, int]:
    """(image size in bytes, inode count) for `mkfs.ext4 -d`: the data plus metadata and a little slack."""
    inode_count = int(inodes * 1.1) + 1024
    size = int((data_bytes + inode_count * 256) * 1.08) + (48 << 20)
    return -(-size // (1 << 20)) * (1 << 20), inode_count


def tree_usage(root: Path, block: int = 4096) -> tuple[int, int]:
    """Bytes of 4 KiB blocks and the number of inodes the tree needs on ext4."""
    used, inodes = block, 1  # the root directory
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            inodes += 1
            if stat.S_ISDIR(st.st_mode):
                used += max(block, -(-st.st_size // block) * block)
            elif not stat.S_ISLNK(st.st_mode) or st.st_size > 59:  # short symlinks live in the inode
                used += -(-st.st_size // block) * block
    return used, inodes


# --- stages (I/O) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    packages: list[str]
    dpkg_options: list[str]
    trim_paths: list[str]
    trim_packages: list[str]
    files: Path  # copied over the root: etc/hostname, ...
    appliance_init: Path
    agent: Path

    @classmethod
    def load(cls, guest_dir: Path) -> Recipe:
        return cls(
            packages=parse_list((guest_dir / "packages.txt").read_text()),
            dpkg_options=parse_list((guest_dir / "dpkg-options.txt").read_text()),
            trim_paths=parse_list((guest_dir / "trim-paths.txt").read_text()),
            trim_packages=parse_list((guest_dir / "trim-packages.txt").read_text()),
            files=guest_dir / "files",
            appliance_init=guest_dir / "init" / "appliance-init",
            agent=guest_dir / "agent" / "appliance_agent",
        )


def base_stage(suite: str, sources: list[str], packages: list[str], dpkg_options: list[str],
               cache_dir: Path, refresh: bool) -> Path:
    """The mmdebstrap tarball for these inputs, built once and reused."""
    key = sha256_json({"suite": suite, "sources": sources, "packages": sorted(packages), "dpkg": dpkg_options})
    tarball = cache_dir / "stages" / f"rootfs-base-{key[:16]}.tar"
    with exclusive(tarball.with_suffix(".lock")):
        if tarball.exists() and not refresh:
            return tarball
        with atomic_output(tarball) as partial:
            run("rootfs: mmdebstrap", mmdebstrap_args(suite, sources, packages, dpkg_options, partial))
    return tarball


def wheels_stage(pins: list[str], suite: str, cache_dir: Path, refresh: bool = False) -> list[Path]:
    """The wheels for the pins and their dependencies; a resolution is recorded, so a rebuild downloads nothing.

    refresh resolves the (unpinned) dependencies again; wheels already in the cache are not downloaded again.
    """
    target = SUITES[suite]
    platforms = manylinux_platforms(target["glibc"])
    key = sha256_json({"pins": sorted(pins), "platforms": platforms, "python": target["python"]})[:16]
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    lock = wheels / f"resolved-{key}.txt"
    if lock.exists() and not refresh:
        files = [wheels / name for name in parse_list(lock.read_text())]
        if all(f.exists() for f in files):
            return files
    remove_leftovers(wheels, ".download-*")
    download = wheels / f".download-{os.getpid()}"
    shutil.rmtree(download, ignore_errors=True)
    try:
        run("rootfs: pip download", [
            sys.executable, "-m", "pip", "download", "--dest", download, "--find-links", wheels, "--no-input",
            *wheel_target_args(platforms, target["python"]), *pins,
        ], env=pip_env(os.environ))
        names = sorted(p.name for p in download.iterdir() if p.name.endswith(".whl"))
        for name in names:
            if not (wheels / name).exists():
                with atomic_output(wheels / name) as partial:
                    (download / name).rename(partial)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    with atomic_output(lock) as partial:
        partial.write_text("".join(f"{name}\n" for name in names))
    return [wheels / name for name in names]


def chroot(phase: str, root: Path, argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """Run a command in the root with /proc mounted, in a private mount namespace (nothing to unmount)."""
    env_args = ["env", "-i", *(f"{k}={v}" for k, v in (env or {}).items())]
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    return run(phase, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, root,
                       *env_args, "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", *argv])


def unpack_base(tarball: Path, root: Path) -> None:
    root.mkdir(parents=True)
    run("rootfs: unpack", ["tar", "-C", root, "--numeric-owner", "-xpf", tarball])


def install_wheels(root: Path, wheels: list[Path], suite: str, pins: list[str]) -> dict[str, str]:
    """Install exactly these wheel files (no resolution, no index) and check the pins; returns name -> version."""
    target = SUITES[suite]
    site = root / SITE_PACKAGES
    run("rootfs: pip install", [
        sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-input",
        "--target", site, *wheel_target_args(manylinux_platforms(target["glibc"]), target["python"]), *wheels,
    ], env=pip_env(os.environ))
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with the host's python in the shebang
    installed = installed_distributions(site)
    problems = check_pins(parse_pins(pins), installed)
    if problems:
        raise BuildError("rootfs: pip install: " + "; ".join(problems))
    return installed


def installed_distributions(site: Path) -> dict[str, str]:
    found = {}
    for metadata in site.glob("*.dist-info/METADATA"):
        name, version = parse_metadata(metadata.read_text(errors="replace"))
        found[canonical_name(name)] = version
    return dict(sorted(found.items()))


def importable_packages(site: Path) -> list[str]:
    names: set[str] = set()
    for record in site.glob("*.dist-info/RECORD"):
        names.update(top_level_packages(record.read_text(errors="replace")))
    return sorted(names)


PIP_INDEX_FILE = "etc/appliance/pip-index-url"  # read by appliance_agent/magics.py (%pip)


def install_appliance(root: Path, recipe: Recipe, pip_index_url: str | None = None) -> None:
    """The guest agent package, /sbin/appliance-init, the static files and the operator's %pip index."""
    agent = root / "usr/lib/appliance/appliance_agent"
    shutil.copytree(recipe.agent, agent, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = root / "usr/sbin/appliance-init"  # /sbin is a symlink to usr/sbin in a merged-/usr root
    shutil.copyfile(recipe.appliance_init, init)
    init.chmod(0o755)
    shutil.copytree(recipe.files, root, dirs_exist_ok=True, symlinks=True)
    for directory in ("data", "media/root-ro", "media/root-rw"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    write_pip_index(root, pip_index_url)
    add_code_user(root)


def write_pip_index(root: Path, url: str | None) -> None:
    """Root-owned and read-only to user code: %pip installs from this index only (none: no file, no %pip)."""
    if url is None:
        return
    path = root / PIP_INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n")
    path.chmod(0o644)


def add_code_user(root: Path) -> None:
    """The unprivileged guest user that runs user code (appliance_agent/codeuser.py), with its own home outside
    /data (so tools' caches do not show up among the user's files). Written into the passwd files directly: no
    chroot and no useradd for three lines, and the same ids in every image (the agent finds it by name)."""
    name, uid, home = "sandbox", CODE_USER_ID, "/home/sandbox"
    entries = {
        "etc/passwd": f"{name}:x:{uid}:{uid}:user code:{home}:/bin/bash\n",
        "etc/group": f"{name}:x:{uid}:\n",
        "etc/shadow": f"{name}:!:19000::::::\n",  # locked: no password login (there is none anyway)
    }
    for relative, line in entries.items():
        path = root / relative
        text = path.read_text() if path.exists() else ""
        if any(existing.split(":", 1)[0] == name for existing in text.splitlines()):
            continue
        path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line)
    home_dir = root / home.lstrip("/")
    home_dir.mkdir(parents=True, exist_ok=True)
    home_dir.chmod(0o750)
    os.chown(home_dir, uid, uid)


def install_modules(root: Path, modules: list[Path], directory: str) -> None:
    """Kernel modules the agent loads on request, in load order: the .ko files plus `order` listing them."""
    target = root / directory
    target.mkdir(parents=True, exist_ok=True)
    for path in modules:
        shutil.copyfile(path, target / path.name)
    (target / "order").write_text("".join(f"{path.name}\n" for path in modules))


def trim(root: Path, recipe: Recipe, requested: list[str]) -> list[str]:
    """Purge build-only packages that came in as dependencies, then delete the listed paths.

    A package the spec's apt_packages name, or one they need, is never purged (build-essential keeps gcc).
    """
    query = dpkg_query(root)
    keep = dependency_closure(requested, parse_dpkg_depends(query))
    purge = packages_to_purge(parse_dpkg_query(query), recipe.trim_packages, keep)
    if purge:
        chroot("rootfs: trim", root, ["dpkg", "--purge", "--force-depends", *purge])
    for pattern in recipe.trim_paths:
        if not _SAFE_GLOB.match(pattern) or pattern.startswith("/") or ".." in pattern.split("/"):
            raise BuildError(f"rootfs: trim: unsafe pattern {pattern!r} in trim-paths.txt")
        for path in sorted(root.glob(pattern)):  # parents sort first; their children are gone by then
            if not path.is_symlink() and not path.exists():
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return purge


def dpkg_query(root: Path) -> str:
    return run("rootfs: dpkg-query", ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
                                      "-f", DPKG_QUERY_FORMAT])


def finish_python(root: Path, import_names: list[str]) -> None:
    """Byte-compile (the root is read-only at run time), build matplotlib's font cache, import everything once."""
    env = {"HOME": "/root", "MPLBACKEND": "Agg", "LANG": "C.UTF-8"}
    chroot("rootfs: compile", root, ["python3", "-m", "compileall", "-q", "-j", "0",
                                     "/" + SITE_PACKAGES, "/usr/lib/appliance", "/usr/lib/python3/dist-packages"],
           env=env)
    check = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
    if "matplotlib" in import_names:
        check += "import matplotlib.font_manager\n"
    chroot("rootfs: import check", root, ["python3", "-B", "-c", check, *import_names], env=env)


def make_ext4(root: Path, image: Path) -> None:
    used, inodes = tree_usage(root)
    size, inode_count = ext4_geometry(used, inodes)
    run("rootfs: mkfs.ext4", ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "appliance-root", "-m", "0",
                              "-N", str(inode_count), "-E", "nodiscard", "-d", root, image, f"{size // 1024}k"])
