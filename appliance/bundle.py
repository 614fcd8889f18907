"""The offline bundle: one tar holding everything a host needs, so nothing is fetched at deploy time.

    manifest.json           always the first member: format, versions, and sha256 + size of every other file
    debs/                   the host packages and their whole dependency closure, as a flat apt repository
                            (Packages index written here; no dpkg-dev needed). QEMU is >= 10: on Debian 12 it
                            comes from bookworm-backports (pinned to QEMU only, as `make setup` does); the
                            manifest's `package_versions` records each package's exact version
    wheels/                 this project's wheel and its runtime dependencies, for `pip install --no-index`
    images/<id>/            the guest image (vmlinuz, initrd.img, rootfs.ext4, manifest.json)
    ansible/                ansible.cfg, playbooks/ and roles/

Which Debian packages go in is read from the roles themselves (every `<role>_packages` list in
roles/*/defaults/main.yml), so a role and the bundle cannot disagree. Downloads are cached under the spec's cache_dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path, PurePosixPath
from typing import IO, Any

from . import host_tools
from .progress import Progress

FORMAT = 1
MANIFEST = "manifest.json"
# Debian 12's python3: the wheelhouse's compiled wheels must match the hosts' interpreter, not just this one.
TARGET_PYTHON = (3, 11)
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.ext4", "manifest.json")
PROJECT_DIR = Path(__file__).resolve().parents[1]
_ANSIBLE_CONTENT = ("ansible.cfg", "playbooks", "roles")
_SKIP_PARTS = {"__pycache__", ".pytest_cache"}
# `apt-get -s install` output: "Inst name (version release [arch])", optionally with "[old version]" after the name.
_INST = re.compile(r"^Inst (?P<name>\S+) (?:\[[^\]]*\] )?\((?P<version>\S+) .*\[(?P<arch>[^\]]+)\]\)")
_CHUNK = 1 << 20
_DEBIAN_VERSION = re.compile(r"[0-9][A-Za-z0-9.+~:-]*")  # what may follow `name=` in the roles' apt install


class BundleError(Exception):
    """A bundle that cannot be built or trusted; the message is one line naming the file or step at fault."""


# --- pure pieces ------------------------------------------------------------------------------------------------


def role_packages(roles_dir: Path) -> list[str]:
    """Every Debian package a role installs: the `<role>_packages` lists of each role's defaults."""
    try:
        import yaml  # comes with ansible-core; only bundling and deploying need it
    except ImportError:
        raise BundleError("bundle: PyYAML is missing; install the deploy tools: pip install 'appliance[dev]'") from None

    packages: set[str] = set()
    for defaults in sorted(roles_dir.glob("*/defaults/main.yml")):
        data = yaml.safe_load(defaults.read_text()) or {}
        role = defaults.parents[1].name
        value = data.get(f"{role}_packages", [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise BundleError(f"{defaults}: {role}_packages must be a list of package names")
        packages.update(value)
    return sorted(packages)


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        from .build.apt import Apt  # the build package is heavy to import; only fetching needs it

        return Apt.deb_filename(self.name, self.version, self.arch)


def parse_simulated_install(output: str) -> list[Deb]:
    """The packages `apt-get -s install` would unpack (with an empty dpkg status: the whole closure)."""
    debs = []
    for line in output.splitlines():
        match = _INST.match(line)
        if match:
            debs.append(Deb(match["name"], match["version"], match["arch"]))
    return sorted(debs, key=lambda d: d.name)


def packages_stanza(control: str, filename: str, size: int, digests: dict[str, str]) -> str:
    """One Packages entry, as dpkg-scanpackages writes it: the control fields, then where and what the file is."""
    fields = control.rstrip("\n")
    return (
        f"{fields}\nFilename: ./{filename}\nSize: {size}\n"
        f"MD5sum: {digests['md5']}\nSHA1: {digests['sha1']}\nSHA256: {digests['sha256']}\n"
    )


def check_member_name(name: str) -> str:
    """A tar member name we are willing to extract: relative, normalized, nothing escaping the target."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name != str(path) or not path.parts:
        raise BundleError(f"unsafe path in bundle: {name!r}")
    return name


def build_manifest(files: dict[str, dict[str, Any]], *, image_id: str, host_packages: list[str],
                   package_versions: dict[str, str], created: datetime,
                   appliance_version: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "appliance_version": appliance_version,
        "created": created.astimezone(UTC).isoformat(timespec="seconds"),
        "python": ".".join(map(str, TARGET_PYTHON)),
        "image_id": image_id,
        "host_packages": host_packages,
        # every .deb of debs/ by package name: the roles install exactly these versions (an older QEMU on a host
        # is upgraded, a newer one from elsewhere is not silently kept)
        "package_versions": dict(sorted(package_versions.items())),
        "files": dict(sorted(files.items())),
    }


def parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} is not a format-{FORMAT} bundle manifest")
    versions = manifest.get("package_versions", {})
    if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _DEBIAN_VERSION.fullmatch(v) for k, v in versions.items()):
        raise BundleError(f"{MANIFEST}: package_versions must map package names to Debian versions")
    for name, record in manifest["files"].items():
        check_member_name(name)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise BundleError(f"{MANIFEST}: entry {name!r} has no sha256")
    return manifest


# --- hashing and reading ------------------------------------------------------------------------------------------


def _digest_stream(stream: IO[bytes], sink: IO[bytes] | None = None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while block := stream.read(_CHUNK):
        digest.update(block)
        size += len(block)
        if sink is not None:
            sink.write(block)
    return digest.hexdigest(), size


def file_record(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        sha256, size = _digest_stream(stream)
    return {"sha256": sha256, "size": size}


def _read_bundle(bundle: Path, extract_to: Path | None) -> dict[str, Any]:
    """Check every member against the manifest (and optionally extract it); returns the manifest.

    One pass over the tar: the manifest is its first member, so each later member is hashed as it streams by.
    """
    if not bundle.is_file():
        raise BundleError(f"{bundle}: no such bundle file")
    try:
        with tarfile.open(bundle, "r:*") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise BundleError(f"{bundle}: not an appliance bundle ({MANIFEST} is not its first member)")
            manifest_bytes = tar.extractfile(first).read()  # type: ignore[union-attr]
            manifest = parse_manifest(manifest_bytes)
            if extract_to is not None:
                (extract_to / MANIFEST).write_bytes(manifest_bytes)
            expected: dict[str, dict[str, Any]] = manifest["files"]
            seen: set[str] = set()
            for member in tar:
                if member is first:  # iterating a TarFile starts over from its first member
                    continue
                name = check_member_name(member.name)
                if member.isdir():
                    if extract_to is not None:
                        (extract_to / name).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BundleError(f"{bundle}: {name}: only regular files and directories may be in a bundle")
                if name not in expected:
                    raise BundleError(f"{bundle}: {name} is not listed in {MANIFEST}")
                if name in seen:
                    raise BundleError(f"{bundle}: {name} appears twice")
                seen.add(name)
                source = tar.extractfile(member)
                assert source is not None
                if extract_to is None:
                    sha256, _ = _digest_stream(source)
                else:
                    target = extract_to / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with target.open("wb") as sink:
                        sha256, _ = _digest_stream(source, sink)
                    target.chmod(member.mode & 0o755 | 0o600)
                if sha256 != expected[name]["sha256"]:
                    raise BundleError(
                        f"{bundle}: {name}: checksum mismatch (manifest {expected[name]['sha256'][:12]}…, "
                        f"file {sha256[:12]}…); the bundle is corrupted, build or copy it again"
                    )
            missing = sorted(set(expected) - seen)
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise BundleError(f"{bundle}: {missing[0]}{more} listed in {MANIFEST} but missing")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{bundle}: cannot read the bundle ({exc})") from None
    return manifest


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """Raise BundleError naming the first problem; return the manifest when every file matches it."""
    return _read_bundle(bundle, None)


def unpack_bundle(bundle: Path, dest: Path) -> dict[str, Any]:
    """Verify and extract in one pass; on a mismatch the caller discards dest (it may hold part of the bundle)."""
    dest.mkdir(parents=True, exist_ok=True)
    return _read_bundle(bundle, dest)


# --- gathering the contents (I/O) ---------------------------------------------------------------------------------


def download_debs(packages: list[str], mirror: str, suite: str, cache_dir: Path) -> list[Path]:
    """The .debs of `packages` and their whole Depends/Pre-Depends closure, resolved against an empty system.

    Resolving as if nothing were installed makes the repository complete for any Debian 12 host, whatever it
    already has; apt on the host then installs only what is missing. Files are cached in <cache_dir>/debs.
    QEMU comes from the suite's backports where its own is too old (Apt.with_qemu_backports).
    """
    from .build.apt import Apt
    from .build.common import BuildError

    phase = "bundle: host packages"
    sources, preferences = Apt.with_qemu_backports(mirror, suite)
    key = hashlib.sha256(json.dumps([sources, preferences]).encode()).hexdigest()[:16]
    apt = Apt(cache_dir / "apt" / f"bundle-{key}", sources, preferences)
    debs_dir = cache_dir / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    try:
        apt(phase, "apt-get", "update")
        plan = parse_simulated_install(
            apt(phase, "apt-get", "--simulate", "--no-install-recommends", "install", *packages)
        )
        missing = [deb for deb in plan if not (debs_dir / deb.filename).exists()]
        if missing:
            apt(phase, "apt-get", "download", *(f"{d.name}={d.version}" for d in missing), cwd=debs_dir)
    except BuildError as exc:
        raise BundleError(str(exc)) from None
    if not plan:
        raise BundleError(f"{phase}: apt resolved nothing for {', '.join(packages)}")
    paths = [debs_dir / deb.filename for deb in plan]
    absent = [p.name for p in paths if not p.exists()]
    if absent:
        raise BundleError(f"{phase}: apt-get download left no {absent[0]}")
    return paths


def write_packages_index(debs: list[Path], index: Path) -> dict[str, str]:
    """The flat repository's Packages file (what dpkg-scanpackages would write), from `dpkg-deb --field`.
    Returns package -> version, as the control fields (what apt will install) say."""
    stanzas, versions = [], {}
    for deb in sorted(debs, key=lambda p: p.name):
        try:
            control = subprocess.run(["dpkg-deb", "--field", str(deb)], check=True, capture_output=True,
                                     text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BundleError(f"bundle: cannot read the control fields of {deb.name} ({exc})") from None
        digests = {"md5": hashlib.md5(usedforsecurity=False), "sha1": hashlib.sha1(usedforsecurity=False),
                   "sha256": hashlib.sha256()}
        with deb.open("rb") as stream:
            while block := stream.read(_CHUNK):
                for digest in digests.values():
                    digest.update(block)
        stanzas.append(packages_stanza(control, deb.name, deb.stat().st_size,
                                       {k: d.hexdigest() for k, d in digests.items()}))
        fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line and line[0] != " ")
        versions[fields.get("Package", deb.name)] = fields.get("Version", "")
    index.write_text("\n".join(stanzas))
    return versions


def check_minimum_versions(versions: dict[str, str]) -> None:
    """Refuse a bundle whose QEMU is older than the supported release (a suite without it, a stale mirror)."""
    for package, minimum in host_tools.MIN_VERSIONS.items():
        if package in versions and not host_tools.version_at_least(versions[package], minimum):
            raise BundleError(f"bundle: {package} {versions[package]} is older than the supported {minimum}; on "
                              "Debian 12 it comes from bookworm-backports: check that the mirror carries it")


def build_wheels(project_dir: Path, cache_dir: Path, dest: Path) -> list[Path]:
    """This project's wheel and every runtime dependency's, built or fetched by pip (its cache under cache_dir)."""
    if sys.version_info[:2] != TARGET_PYTHON:
        want = ".".join(map(str, TARGET_PYTHON))
        raise BundleError(f"bundle: the hosts run Debian 12's Python {want}; run 'appliance bundle' with "
                          f"Python {want} so the wheelhouse matches (this is {sys.version.split()[0]})")
    if not (project_dir / "pyproject.toml").is_file():
        raise BundleError(f"bundle: {project_dir} has no pyproject.toml; bundling needs the appliance source tree")
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest),
            "--cache-dir", str(cache_dir / "pip"), str(project_dir)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise BundleError(f"bundle: pip wheel failed: {' | '.join(lines[-2:]) or 'no output'}")
    wheels = sorted(dest.glob("*.whl"))
    if not any(w.name.startswith("appliance-") for w in wheels):
        raise BundleError(f"bundle: pip wheel built no appliance-*.whl in {dest}")
    return wheels


def check_image_dir(image_dir: Path) -> str:
    """The image id (its directory name) once every file the hosts boot from is there."""
    if not image_dir.is_dir():
        raise BundleError(f"bundle: no guest image at {image_dir} (run 'appliance build guest' first)")
    for name in IMAGE_FILES:
        if not (image_dir / name).is_file():
            raise BundleError(f"bundle: guest image {image_dir} lacks {name} (rebuild it)")
    return image_dir.name


def _tree(top: Path, arc_top: str) -> Iterator[tuple[str, Path]]:
    if top.is_file():
        yield arc_top, top
        return
    for path in sorted(top.rglob("*")):
        relative = path.relative_to(top)
        if path.is_file() and not _SKIP_PARTS.intersection(relative.parts) and path.suffix != ".pyc":
            yield f"{arc_top}/{relative.as_posix()}", path


def ansible_content(project_dir: Path) -> list[tuple[str, Path]]:
    entries = []
    for name in _ANSIBLE_CONTENT:
        source = project_dir / name
        if not source.exists():
            raise BundleError(f"bundle: {source} is missing; bundling needs the appliance source tree")
        entries.extend(_tree(source, f"ansible/{name}"))
    return entries


def write_bundle(output: Path, manifest: dict[str, Any], entries: list[tuple[str, Path]]) -> None:
    """Write the tar (gzip-compressed if the name ends in .gz/.tgz) beside the target, then rename it into place."""
    from .build.common import atomic_output

    compress = "gz" if output.name.endswith((".gz", ".tgz")) else ""
    with atomic_output(output) as partial, tarfile.open(partial, f"w:{compress}", format=tarfile.PAX_FORMAT) as tar:
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o644, int(datetime.now(UTC).timestamp())
        tar.addfile(info, io.BytesIO(data))
        for arcname, path in entries:
            info = tar.gettarinfo(str(path), arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            with path.open("rb") as stream:
                tar.addfile(info, stream)


@dataclass(frozen=True)
class Contents:
    """What a bundle holds: (member name, file) pairs and the manifest that lists each with its sha256."""

    entries: list[tuple[str, Path]]
    manifest: dict[str, Any]


def gather(
    scratch: Path,
    *,
    image_dir: Path,
    cache_dir: Path,
    mirror: str,
    suite: str,
    progress: Progress,
    project_dir: Path = PROJECT_DIR,
    ansible: bool = True,
    fetch_debs: Callable[[list[str], str, str, Path], list[Path]] = download_debs,
    fetch_wheels: Callable[[Path, Path, Path], list[Path]] = build_wheels,
) -> Contents:
    """The one choice of what a bundle holds: the roles' host packages with their Packages index, the wheelhouse,
    the guest image's files and (unless ansible=False: the host image applies the roles from the source tree) the
    Ansible content. Made files (the index, the wheels) go to `scratch`; the rest are the cached files themselves.
    """
    image_id = check_image_dir(image_dir)
    packages = role_packages(project_dir / "roles")
    if not packages:
        raise BundleError(f"bundle: no <role>_packages lists under {project_dir / 'roles'}")
    scratch.mkdir(parents=True, exist_ok=True)
    with progress.phase("host packages", f"{len(packages)} packages and their dependencies"):
        debs = fetch_debs(packages, mirror, suite, cache_dir)
        versions = write_packages_index(debs, scratch / "Packages")
        check_minimum_versions(versions)
    with progress.phase("wheelhouse", "appliance and its dependencies"):
        wheels = fetch_wheels(project_dir, cache_dir, scratch / "wheels")
    entries: list[tuple[str, Path]] = [
        ("debs/Packages", scratch / "Packages"),
        *((f"debs/{deb.name}", deb) for deb in debs),
        *((f"wheels/{wheel.name}", wheel) for wheel in wheels),
        *((f"images/{image_id}/{name}", image_dir / name) for name in IMAGE_FILES),
        *(ansible_content(project_dir) if ansible else []),
    ]
    with progress.phase("checksums", f"{len(entries)} files"):
        files = {arcname: file_record(path) for arcname, path in entries}
    manifest = build_manifest(files, image_id=image_id, host_packages=packages, package_versions=versions,
                              created=datetime.now(UTC), appliance_version=package_version("appliance"))
    return Contents(entries, manifest)


def create_bundle(output: Path, *, progress: Progress, **gather_args: Any) -> dict[str, Any]:
    """Gather (gather_args are gather's keywords: image_dir, cache_dir, mirror, suite, ...), hash and write the
    bundle; returns its manifest."""
    with tempfile.TemporaryDirectory(prefix="appliance-bundle-") as scratch:
        contents = gather(Path(scratch), progress=progress, **gather_args)
        total = sum(record["size"] for record in contents.manifest["files"].values())
        with progress.phase("write", f"{output.name}, {total / 2**20:.0f} MiB"):
            write_bundle(output, contents.manifest, contents.entries)
    return contents.manifest


def summary(manifest: dict[str, Any]) -> Iterable[str]:
    """What an operator wants to know about a bundle, one fact a line."""
    files: dict[str, dict[str, Any]] = manifest["files"]

    def count(prefix: str) -> tuple[int, float]:
        chosen = [r["size"] for name, r in files.items() if name.startswith(prefix)]
        return len(chosen), sum(chosen) / 2**20

    debs, debs_mib = count("debs/")
    wheels, wheels_mib = count("wheels/")
    _, image_mib = count("images/")
    yield f"appliance {manifest['appliance_version']}, created {manifest['created']}"
    yield f"guest image {manifest['image_id']} ({image_mib:.0f} MiB)"
    yield f"{debs - 1} Debian packages ({debs_mib:.0f} MiB) for: {', '.join(manifest['host_packages'])}"
    versions = manifest.get("package_versions", {})
    if "qemu-system-x86" in versions:
        yield f"QEMU {versions['qemu-system-x86']}"
    yield f"{wheels} wheels ({wheels_mib:.0f} MiB) for Python {manifest['python']}"
    yield f"{len(files)} files, each checked against its sha256"
