"""What `appliance doctor` checks. Each check returns a Finding; pure except for the probes it is handed."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from appliance import host_tools

MIN_FREE_IMAGES_GIB = 6.0


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | fail
    subject: str
    detail: str
    fix: str = ""


def tool_findings(
    which: Callable[[str], str | None] = shutil.which,
    matches: Callable[[str], bool] = host_tools.matches,
    required: Collection[str] = host_tools.REQUIRED_PURPOSES,
) -> list[Finding]:
    """Every program (and data package) of the host-tools table: one ok line per purpose that has all it needs,
    one line per missing thing naming what it is for and its package. Missing for a `required` purpose fails."""
    absent = host_tools.missing(which=which, matches=matches)
    incomplete = {purpose for item in absent for purpose in item.purposes}
    findings = []
    for purpose in host_tools.PURPOSES:
        if purpose not in incomplete:
            names = [*host_tools.programs(purpose), *(d.package for d in host_tools.data(purpose))]
            findings.append(Finding("ok", purpose, ", ".join(names)))
    for item in absent:
        level = "fail" if set(required).intersection(item.purposes) else "warn"
        findings.append(Finding(level, item.name, item.line(), host_tools.install_command(item.package)))
    return findings


QEMU_FIX = ("make host-packages (on Debian 12 it enables bookworm-backports pinned to QEMU; Debian 13 ships QEMU 10); "
            "on a node: appliance deploy with a current bundle")


def qemu_finding(release: tuple[int, int] | None, version: str, problem: str = "") -> Finding:
    """QEMU's release against the supported minimum (host_tools.QEMU_MIN_RELEASE): older fails, since the engine
    needs mapped-ram migration, `file:` URIs and read-only file-backed memory. `release` None: not probed
    (`problem` says why; a missing binary is the tools check's finding)."""
    minimum = ".".join(map(str, host_tools.QEMU_MIN_RELEASE))
    if release is None:
        return Finding("fail", "qemu version", problem or "unknown", QEMU_FIX)
    if release < host_tools.QEMU_MIN_RELEASE:
        return Finding("fail", "qemu version", f"{version}: older than the supported {minimum}", QEMU_FIX)
    return Finding("ok", "qemu version", version)


def disk_finding(path: Path, free_bytes: Callable[[Path], int]) -> Finding:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_gib = free_bytes(probe) / (1 << 30)
    if free_gib < MIN_FREE_IMAGES_GIB:
        detail = f"{free_gib:.1f} GiB free at {probe} (a guest build needs ~{MIN_FREE_IMAGES_GIB:g})"
        return Finding("warn", "disk", detail, "free space or set paths.cache_dir to a larger filesystem")
    return Finding("ok", "disk", f"{free_gib:.1f} GiB free at {probe}")


def accelerator_findings(
    kvm_problem: str | None, choice: tuple[str, str] | None, jail_kvm_problem: str | None = None
) -> list[Finding]:
    """`choice` is (accelerator, reason) from a real probe boot, or None if no guest image exists to probe with.
    `jail_kvm_problem` is why the jailed VM user cannot open /dev/kvm (service.engine.jail.kvm_jail_problem), or
    None: the jail itself is in force then, only KVM is lost to it, and the fix is the device's group."""
    findings = []
    if kvm_problem is not None:
        findings.append(Finding("warn", "kvm device", kvm_problem,
                                "enable VT-x/AMD-V in firmware and load kvm_intel/kvm_amd, or accept TCG"))
    elif jail_kvm_problem is not None:
        from service.engine.jail import KVM_GROUP_FIX

        findings.append(Finding("warn", "kvm device", jail_kvm_problem, KVM_GROUP_FIX))
    else:
        findings.append(Finding("ok", "kvm device", "/dev/kvm answers the KVM API"))
    if choice is None:
        findings.append(Finding("warn", "accelerator", "not probed: no guest image yet", "appliance build guest"))
    elif choice[0] == "kvm":
        findings.append(Finding("ok", "accelerator", f"kvm: {choice[1]}"))
    else:
        findings.append(Finding("warn", "accelerator", f"tcg: {choice[1]}",
                                "sandboxes work, 10-30x slower for CPU-bound code"))
    return findings


def can_run_sandboxes(findings: list[Finding]) -> bool:
    return not any(finding.level == "fail" for finding in findings)


# --- the node's TLS front door (roles/node_proxy) ------------------------------------------------------------------

PROXY_CA_FILE = Path("/etc/haproxy/tls/site-ca.pem")  # the node_proxy role's node_proxy_ca_file
CERT_RENEW_DAYS = 30
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class ProxyProbe:
    """What one HTTPS GET /v1/healthz through the proxy on loopback showed."""

    status: int | None = None  # HTTP status; None: no answer (error says why)
    cert_days_left: float | None = None
    error: str = ""


def proxy_findings(api_host: str, proxy_port: int | None, probe: ProxyProbe | None) -> list[Finding]:
    """The API behind HAProxy: the proxy answers over TLS with a certificate that is not about to expire, and the
    API itself is on loopback (else clients can go around TLS and the proxy's limits). No proxy configured (a
    developer's machine): nothing to say unless the API faces the network."""
    fix_role = "appliance deploy (the node_proxy role puts HAProxy in front of the API)"
    findings = []
    if api_host not in _LOOPBACK:
        findings.append(Finding("warn", "api address", f"the API listens on {api_host}: plain HTTP from the network, "
                                "no TLS", f"set service.host = '127.0.0.1' and reach it through HAProxy; {fix_role}"))
    if proxy_port is None:
        return findings
    where = f"https://127.0.0.1:{proxy_port}"
    if probe is None or probe.status is None:
        why = probe.error if probe is not None else "not probed"
        findings.append(Finding("warn", "tls proxy", f"{where}: {why}",
                                "systemctl status haproxy; journalctl -u haproxy"))
    elif probe.status != 200:
        findings.append(Finding("warn", "tls proxy", f"{where}/v1/healthz answered {probe.status}",
                                "systemctl status appliance-api; journalctl -u appliance-api"))
    else:
        findings.append(Finding("ok", "tls proxy", f"{where} answers /v1/healthz"))
    if probe is not None and probe.cert_days_left is not None:
        days = probe.cert_days_left
        if days < CERT_RENEW_DAYS:
            findings.append(Finding("warn", "tls certificate", f"expires in {days:.0f} days",
                                    f"{fix_role}: a site CA certificate is renewed {CERT_RENEW_DAYS} days before "
                                    "its end; an operator's certificate must be replaced in the inventory"))
        else:
            findings.append(Finding("ok", "tls certificate", f"valid {days:.0f} more days"))
    return findings


def probe_proxy(port: int, ca_file: Path = PROXY_CA_FILE, timeout_s: float = 10) -> ProxyProbe:
    """One GET /v1/healthz over TLS to the proxy on loopback, verified against the site CA when the node has one
    (the system's trust store otherwise). The host name is not checked: loopback is not a name a certificate
    carries unless the site CA issued it."""
    import socket
    import ssl
    import time

    context = ssl.create_default_context(cafile=str(ca_file) if ca_file.is_file() else None)
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw) as stream:
            not_after = stream.getpeercert().get("notAfter")
            days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400 if not_after else None
            stream.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = stream.recv(64).split(b"\r\n", 1)[0].split()
    except ssl.SSLCertVerificationError as exc:
        return ProxyProbe(error=f"certificate not trusted ({exc.verify_message}; CA file {ca_file})")
    except (OSError, ssl.SSLError) as exc:
        return ProxyProbe(error=f"no TLS answer ({exc})")
    status = int(head[1]) if len(head) >= 2 and head[1].isdigit() else None
    return ProxyProbe(status=status, cert_days_left=days, error="" if status else "no HTTP status line")
