"""A private apt: its own sources, lists, cache and an empty dpkg status under one state directory.

The guest kernel stage, the host image's base and the deploy bundle all resolve Debian packages with it, so the
build machine's apt configuration and installed packages never matter and nothing is installed on it.

    apt = Apt(state_dir, Apt.sources(mirror, suite))
    apt("kernel: fetch", "apt-get", "update")
"""

from __future__ import annotations

from pathlib import Path

from appliance import host_tools
from appliance.build.common import run

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"


class Apt:
    """apt-get / apt-cache confined to `state` (made on construction, with `sources` as its only sources)."""

    def __init__(self, state: Path, sources: list[str], preferences: str = "") -> None:
        self.state = state
        for sub in ("sources.list.d", "preferences.d", "state", "lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
        (state / "sources.list").write_text("".join(f"deb {signed}{line[4:]}\n" for line in sources))
        (state / "status").touch()
        # Written every time (also empty): a state directory reused with other sources keeps no stale pins.
        (state / "preferences").write_text(preferences)

    def __call__(self, phase: str, tool: str, *args: str, cwd: Path | None = None) -> str:
        """Run apt-get or apt-cache on this state; a failure is a one-line BuildError naming `phase`."""
        return run(phase, [tool, *self.options(self.state), *args], cwd=cwd)

    @staticmethod
    def sources(mirror: str, suite: str) -> list[str]:
        """deb lines for the suite, its updates and, for a Debian-layout mirror, its security archive."""
        mirror = mirror.rstrip("/")
        lines = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
        if mirror.endswith("/debian"):
            lines.append(f"deb {mirror}-security {suite}-security main")
        return lines

    @staticmethod
    def with_qemu_backports(mirror: str, suite: str) -> tuple[list[str], str]:
        """(sources, preferences) for the host packages: a suite whose QEMU is older than the supported release
        (host_tools.BACKPORTS: Debian 12) gets its backports suite, pinned to QEMU's packages only."""
        backports = host_tools.BACKPORTS.get(suite)
        if backports is None:
            return Apt.sources(mirror, suite), ""
        return [*Apt.sources(mirror, suite), f"deb {mirror.rstrip('/')} {backports} main"], \
            host_tools.apt_preferences(backports)

    @staticmethod
    def options(state: Path) -> list[str]:
        """apt -o options that confine apt to `state` (sources, lists, cache, an empty dpkg status)."""
        return [
            f"-oDir::Etc::SourceList={state / 'sources.list'}",
            f"-oDir::Etc::SourceParts={state / 'sources.list.d'}",
            f"-oDir::Etc::Preferences={state / 'preferences'}",
            f"-oDir::Etc::PreferencesParts={state / 'preferences.d'}",
            f"-oDir::State={state / 'state'}",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::State::status={state / 'status'}",
            f"-oDir::Cache={state / 'cache'}",
            f"-oAPT::Architecture={ARCH}",
            f"-oAPT::Architectures={ARCH}",
            "-oAcquire::Languages=none",
            "-oAPT::Sandbox::User=root",
            "-oDebug::NoLocking=true",
            "-qq",
        ]

    @staticmethod
    def deb_filename(package: str, version: str, arch: str = ARCH) -> str:
        """The file name `apt-get download` gives a package (an epoch colon becomes %3a)."""
        return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"
