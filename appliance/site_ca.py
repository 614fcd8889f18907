"""The site CA: a private certificate authority that `appliance deploy` keeps on the control machine and that issues
each node's TLS certificate (HAProxy's, roles/node_proxy), when the operator brings no certificate of their own.

    <ca_dir>/ca.key              the CA's private key (0600; never leaves the control machine)
    <ca_dir>/ca.pem              the CA certificate: what clients trust (APPLIANCE_CA_BUNDLE)
    <ca_dir>/nodes/<name>.key    a node's private key (0600; copied to that node only, as HAProxy's crt file)
    <ca_dir>/nodes/<name>.pem    the node's certificate

Made once and kept: a second run reuses the CA, and a node's certificate is issued again only when it is missing,
names other hosts, comes from another CA, or expires within RENEW_BEFORE. Keys are written with O_EXCL at 0600
(never readable by anyone else, not even for a moment) and never printed.

    python -m appliance.site_ca issue --ca-dir DIR --node NAME --name DNS-OR-IP ...   prints {"changed": bool}
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CA_KEY, CA_CERT, NODES = "ca.key", "ca.pem", "nodes"
CA_DAYS = 3650
NODE_DAYS = 397  # what browsers accept at most for a server certificate; renewed well before its end
RENEW_BEFORE = datetime.timedelta(days=30)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class SiteCAError(Exception):
    """A CA directory or request we cannot use; the message is one line."""


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path
    changed: bool


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise SiteCAError("the site CA needs the cryptography package: pip install 'appliance[deploy]'") from None
    return x509, hashes, serialization, ec


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the first byte (O_EXCL: an existing file, or a link planted there, is never followed)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


def _write_public(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o644)
    os.replace(partial, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_ca(ca_dir: Path, common_name: str = "appliance site CA") -> bool:
    """Create the CA in ca_dir unless it is there; True when it was created. A half-present CA is an error (a key
    without its certificate, or the reverse): replacing it would silently distrust every node."""
    x509, hashes, serialization, ec = _crypto()
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    if key_path.exists() and cert_path.exists():
        return False
    if key_path.exists() or cert_path.exists():
        present = key_path if key_path.exists() else cert_path
        raise SiteCAError(f"{ca_dir}: only {present.name} is there; restore the other file from a backup, or move "
                          "the directory away to start a new site CA (every client must then trust the new one)")
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return True


def subject_alt_names(names: Sequence[str]) -> list:
    """DNS names and IP addresses, deduplicated in order; anything else is refused (it would end up in a cert)."""
    x509, *_ = _crypto()
    result, seen = [], set()
    for raw in names:
        name = raw.strip().lower()
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9-]{0,62}\.)*[a-z0-9-]{0,63}", name):
            raise SiteCAError(f"{raw!r} is neither a DNS name nor an IP address")
        result.append(x509.DNSName(name))
    if not result:
        raise SiteCAError("a node certificate needs at least one DNS name or IP address")
    return result


def needs_issue(cert_pem: bytes | None, ca_cert_pem: bytes, wanted: list, now: datetime.datetime) -> str | None:
    """Why a node's certificate must be issued again, or None when the one there serves."""
    x509, *_ = _crypto()
    if cert_pem is None:
        return "missing"
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    if cert.issuer != ca.subject:
        return "issued by another CA"
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "issued by another CA"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return "expires soon"
    try:
        present = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        present = []
    if sorted(map(str, present)) != sorted(map(str, wanted)):
        return "names changed"
    return None


def issue(ca_dir: Path, node: str, names: Sequence[str]) -> Issued:
    """The node's key and certificate under ca_dir/nodes/, issued (and the CA made) only when needed."""
    x509, hashes, serialization, ec = _crypto()
    if not _NODE_NAME.fullmatch(node):
        raise SiteCAError(f"node name {node!r}: letters, digits, '.', '_' and '-' only")
    ensure_ca(ca_dir)
    wanted = subject_alt_names(names)
    key_path, cert_path = ca_dir / NODES / f"{node}.key", ca_dir / NODES / f"{node}.pem"
    ca_pem = (ca_dir / CA_CERT).read_bytes()
    present = cert_path.read_bytes() if cert_path.exists() and key_path.exists() else None
    if needs_issue(present, ca_pem, wanted, _now()) is None:
        return Issued(key_path, cert_path, False)
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path, True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.site_ca")
    commands = parser.add_subparsers(dest="command", required=True)
    issue_parser = commands.add_parser("issue", help="make the CA if needed, then the node's certificate if needed")
    issue_parser.add_argument("--ca-dir", type=Path, required=True)
    issue_parser.add_argument("--node", required=True)
    issue_parser.add_argument("--name", action="append", default=[], help="a DNS name or IP address (repeat)")
    args = parser.parse_args(argv)
    try:
        issued = issue(args.ca_dir, args.node, args.name)
    except (SiteCAError, OSError) as exc:
        print(f"site CA: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"changed": issued.changed, "key": str(issued.key), "cert": str(issued.cert),
                      "ca": str(args.ca_dir / CA_CERT)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
