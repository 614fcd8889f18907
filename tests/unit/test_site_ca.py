"""The site CA (appliance/site_ca.py): made once and kept, keys 0600 and never printed, a node's certificate
issued again only when it no longer serves, and verifiable against the CA by the TLS stack clients use."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from appliance import site_ca


def test_the_ca_is_made_once_with_a_private_key_only_its_owner_reads(tmp_path: Path):
    ca_dir = tmp_path / "ca"
    assert site_ca.ensure_ca(ca_dir) is True
    key, cert = (ca_dir / "ca.key"), (ca_dir / "ca.pem")
    assert key.stat().st_mode & 0o777 == 0o600
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    before = key.read_bytes(), cert.read_bytes()
    assert site_ca.ensure_ca(ca_dir) is False
    assert (key.read_bytes(), cert.read_bytes()) == before  # kept: every client's trust stays valid
    ca = x509.load_pem_x509_certificate(before[1])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_half_present_ca_is_refused_not_replaced(tmp_path: Path):
    site_ca.ensure_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(site_ca.SiteCAError, match=r"only ca\.pem is there"):
        site_ca.ensure_ca(tmp_path)


def test_a_node_certificate_is_issued_once_and_again_only_when_it_no_longer_serves(tmp_path: Path):
    first = site_ca.issue(tmp_path, "node1", ["node1.example.net", "10.0.0.1"])
    assert first.changed and first.key.stat().st_mode & 0o777 == 0o600
    cert = first.cert.read_bytes()
    assert site_ca.issue(tmp_path, "node1", ["node1.example.net", "10.0.0.1"]).changed is False
    assert first.cert.read_bytes() == cert
    renamed = site_ca.issue(tmp_path, "node1", ["node1.example.net", "10.0.0.2"])
    assert renamed.changed  # its names changed
    names = x509.load_pem_x509_certificate(renamed.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node1.example.net"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]


def test_renewal_before_the_end_and_after_a_new_ca(tmp_path: Path):
    issued = site_ca.issue(tmp_path, "n", ["n.example"])
    ca_pem, cert_pem = (tmp_path / "ca.pem").read_bytes(), issued.cert.read_bytes()
    wanted = site_ca.subject_alt_names(["n.example"])
    now = datetime.datetime.now(datetime.UTC)
    assert site_ca.needs_issue(cert_pem, ca_pem, wanted, now) is None
    late = now + datetime.timedelta(days=site_ca.NODE_DAYS) - site_ca.RENEW_BEFORE + datetime.timedelta(days=1)
    assert site_ca.needs_issue(cert_pem, ca_pem, wanted, late) == "expires soon"
    other = tmp_path / "other"
    site_ca.ensure_ca(other, common_name="appliance site CA")  # same name, another key
    assert site_ca.needs_issue(cert_pem, (other / "ca.pem").read_bytes(), wanted, now) == "issued by another CA"


@pytest.mark.parametrize("name", ["a b", "node;rm -rf /", "", "-x"])
def test_names_that_are_neither_dns_nor_ip_are_refused(tmp_path: Path, name: str):
    with pytest.raises(site_ca.SiteCAError):
        site_ca.issue(tmp_path, "node1", [name])


def test_a_node_name_cannot_choose_a_path(tmp_path: Path):
    with pytest.raises(site_ca.SiteCAError, match="node name"):
        site_ca.issue(tmp_path, "../../etc/x", ["n.example"])


def test_the_command_prints_paths_and_never_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert site_ca.main(["issue", "--ca-dir", str(tmp_path), "--node", "n1", "--name", "localhost"]) == 0
    out = capsys.readouterr()
    assert "PRIVATE KEY" not in out.out + out.err
    assert json.loads(out.out)["changed"] is True
    assert site_ca.main(["issue", "--ca-dir", str(tmp_path), "--node", "n1", "--name", "a b"]) == 1
    assert capsys.readouterr().err.startswith("site CA: ")


def test_python_tls_trusts_the_node_certificate_through_the_ca_and_checks_the_name(tmp_path: Path):
    issued = site_ca.issue(tmp_path, "n1", ["localhost", "127.0.0.1"])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(issued.cert, issued.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve(count: int) -> None:
            for _ in range(count):
                conn, _ = listener.accept()
                try:
                    with server_context.wrap_socket(conn, server_side=True) as tls_conn:
                        tls_conn.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass

        server = threading.Thread(target=serve, args=(2,), daemon=True)
        server.start()
        client = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as ok:
            assert ok.recv(2) == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not carry
            client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="other.example")
        server.join(timeout=30)
