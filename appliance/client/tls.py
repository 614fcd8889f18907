"""How the SDK checks the server it talks to over https: the system's trust store, or the site's CA
(APPLIANCE_CA_BUNDLE, e.g. the ca.pem `appliance deploy` keeps), and optionally a pin.

A pin (APPLIANCE_TLS_PIN, comma-separated) is checked during the TLS handshake, before any byte of a request (and
so the API key) is sent. Two forms, both of the server's own certificate:

    sha256//<base64>          the SHA-256 of its SubjectPublicKeyInfo (curl's --pinnedpubkey form; survives a
                              renewal that keeps the key; needs the cryptography package)
    <hex, colons allowed>     the SHA-256 of the whole certificate (`openssl x509 -noout -fingerprint -sha256`)

A pin is checked on top of normal verification, never instead of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import ssl
from collections.abc import Sequence

CA_BUNDLE_ENV, PIN_ENV = "APPLIANCE_CA_BUNDLE", "APPLIANCE_TLS_PIN"
_HEX_PIN = re.compile(r"[0-9a-f]{64}")


class PinMismatch(ssl.SSLError):
    """The server's certificate matches no pin: the connection is closed before anything is sent."""


def parse_pins(text: str) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """(SPKI digests, certificate digests) from a comma-separated pin list; a malformed pin is an error, never
    silently ignored (an ignored pin would be no pin)."""
    spki, cert = set(), set()
    for raw in text.split(","):
        pin = raw.strip()
        if not pin:
            continue
        if pin.startswith("sha256//"):
            try:
                digest = base64.b64decode(pin[len("sha256//"):], validate=True)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"TLS pin {pin!r}: sha256// must be followed by 32 bytes in base64")
            spki.add(digest)
            continue
        hex_digits = pin.replace(":", "").lower()
        if not _HEX_PIN.fullmatch(hex_digits):
            raise ValueError(f"TLS pin {pin!r}: give sha256//<base64 of the SPKI digest> or the certificate's "
                             "SHA-256 fingerprint in hex")
        cert.add(bytes.fromhex(hex_digits))
    return frozenset(spki), frozenset(cert)


def spki_sha256(cert_der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    public = x509.load_der_x509_certificate(cert_der).public_key()
    return hashlib.sha256(public.public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def pin_matches(cert_der: bytes, spki_pins: frozenset[bytes], cert_pins: frozenset[bytes]) -> bool:
    if hashlib.sha256(cert_der).digest() in cert_pins:
        return True
    return bool(spki_pins) and spki_sha256(cert_der) in spki_pins


class PinnedContext(ssl.SSLContext):
    """A verifying context that also checks the pins right after each handshake (httpx/httpcore wrap their
    sockets through wrap_socket with the handshake done on connect)."""

    spki_pins: frozenset[bytes] = frozenset()
    cert_pins: frozenset[bytes] = frozenset()

    def wrap_socket(self, *args, **kwargs):  # type: ignore[override]
        wrapped = super().wrap_socket(*args, **kwargs)
        der = wrapped.getpeercert(binary_form=True)
        if der is None or not pin_matches(der, self.spki_pins, self.cert_pins):
            wrapped.close()
            raise PinMismatch("the server's certificate matches none of the pinned keys (APPLIANCE_TLS_PIN)")
        return wrapped


def httpx_verify(url: str) -> ssl.SSLContext | bool:
    """httpx's `verify` for a base URL: the SDK's context for https (a bad CA file or pin raises ValueError)."""
    return client_context() if url.startswith("https:") else True


def client_context(ca_bundle: str | None = None, pins: str | Sequence[str] | None = None) -> ssl.SSLContext:
    """The context the SDK verifies servers with; arguments default to APPLIANCE_CA_BUNDLE and APPLIANCE_TLS_PIN."""
    ca_bundle = ca_bundle if ca_bundle is not None else os.environ.get(CA_BUNDLE_ENV) or None
    pins = pins if pins is not None else os.environ.get(PIN_ENV, "")
    spki, cert = parse_pins(pins if isinstance(pins, str) else ",".join(pins))
    context_class = PinnedContext if spki or cert else ssl.SSLContext
    context = context_class(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{CA_BUNDLE_ENV}={ca_bundle}: cannot load it as PEM certificates ({exc})") from None
    else:
        context.load_default_certs()
    if isinstance(context, PinnedContext):
        context.spki_pins, context.cert_pins = spki, cert
    return context
