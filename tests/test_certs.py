"""``genofed certs``: the CA, SuperLink certificate and SuperNode keys verify and load as Flower needs."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server import certs_cli
from server.certs import CertBundle, CertsError, generate_certs, ssh_fingerprint, write_supernode_key


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    out = tmp_path_factory.mktemp("certs") / "creds"
    return generate_certs(out, sites=3, hosts=["coordinator.example.org", "10.1.2.3", "fd00::7"], days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_and_private_key_modes(bundle: CertBundle) -> None:
    root = bundle.root
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert names == sorted(["README.txt", "ca.crt", "ca.key", "superlink.crt", "superlink.key", "sites",
                            *[f"sites/site-{i}{ext}" for i in (1, 2, 3) for ext in ("", ".pub")]])
    assert bundle.sites == ("site-1", "site-2", "site-3")
    for private in [bundle.ca_key, bundle.server_key, *(bundle.site_key(n) for n in bundle.sites)]:
        assert _mode(private) == 0o600, private
    for public in [bundle.ca_cert, bundle.server_cert, *(bundle.site_public_key(n) for n in bundle.sites)]:
        assert _mode(public) & 0o077 == 0o044, public  # readable, writable by the owner only
    assert not list(root.parent.glob(f".{root.name}.tmp-*")), "temporary build folder left behind"


def test_ca_signs_server_certificate_with_sensible_extensions(bundle: CertBundle) -> None:
    ca, server = _cert(bundle.ca_cert), _cert(bundle.server_cert)
    server.verify_directly_issued_by(ca)  # signature, issuer name
    ca.verify_directly_issued_by(ca)  # self-signed

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_ku.critical and ca_ku.value.key_cert_sign and ca_ku.value.crl_sign

    bc = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    for cert in (ca, server):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp384r1"
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
        assert cert.not_valid_before_utc <= dt.datetime.now(dt.timezone.utc)

    key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()
    ca_key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), password=None)
    assert ca_key.public_key() == ca.public_key()


def test_server_certificate_sans(bundle: CertBundle) -> None:
    san = _cert(bundle.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::7")]


def test_tls_handshake_verifies_strictly(bundle: CertBundle) -> None:
    """A TLS server with superlink.crt/.key is trusted by a client that has only ca.crt (strict X.509)."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(bundle.ca_cert))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        for name in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # click deprecations raised by importing flwr's CLI
def test_supernode_keys_are_what_flower_loads(bundle: CertBundle) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    fingerprints = set()
    for name in bundle.sites:
        private = serialization.load_ssh_private_key(bundle.site_key(name).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)  # flower-supernode requires an EC key
        assert private.curve.name == "secp384r1"
        public_line = bundle.site_public_key(name).read_text()
        assert public_line.startswith("ecdsa-sha2-nistp384 ") and public_line.rstrip().endswith(f"genofed-{name}")
        public = serialization.load_ssh_public_key(public_line.encode())
        assert public == private.public_key()
        assert try_load_public_key(bundle.site_public_key(name))  # what `flwr supernode register` does
        fingerprints.add(ssh_fingerprint(public_line))
    assert len(fingerprints) == len(bundle.sites)  # distinct keys


def test_readme_says_which_file_goes_where(bundle: CertBundle) -> None:
    text = (bundle.root / "README.txt").read_text()
    for needle in ("ca.crt", "superlink.crt", "superlink.key", "--enable-supernode-auth",
                   "--disable-runtime-dependency-installation", "flwr supernode register",
                   "--auth-supernode-private-key", "coordinator.example.org", "never ca.key"):
        assert needle in text, needle
    for name in bundle.sites:
        assert ssh_fingerprint(bundle.site_public_key(name).read_text()) in text


def test_refuses_to_overwrite_non_empty_folder(bundle: CertBundle) -> None:
    before = {p: p.read_bytes() for p in bundle.root.rglob("*") if p.is_file()}
    with pytest.raises(CertsError) as err:
        generate_certs(bundle.root, sites=2)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{bundle.root}: folder exists and is not empty; refusing to overwrite credentials "
                       "(choose another --out, or remove the old folder first)")
    assert {p: p.read_bytes() for p in bundle.root.rglob("*") if p.is_file()} == before


def test_empty_folder_is_filled_and_file_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    made = generate_certs(tmp_path / "empty", sites=1)
    assert made.site_key(1).is_file() and CertBundle.load(tmp_path / "empty").sites == ("site-1",)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CertsError, match="exists and is not a folder"):
        generate_certs(tmp_path / "file", sites=1)
    made = generate_certs(tmp_path / "new" / "deeper", sites=2)  # parents are created
    assert made.sites == ("site-1", "site-2")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sites": 0}, "--sites"), ({"sites": 1, "days": 0}, "--days"),
    ({"sites": 1, "hosts": ["bad host!"]}, "neither an IP address nor a valid DNS name"),
    ({"sites": 1, "hosts": ["https://x.org"]}, "no port, no scheme"),
])
def test_bad_arguments_write_nothing(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(CertsError, match=match):
        generate_certs(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_supernode_key_never_overwrites(tmp_path: Path) -> None:
    private, public = write_supernode_key(tmp_path, "extra")
    assert _mode(private) == 0o600
    with pytest.raises(CertsError, match="refusing to overwrite"):
        write_supernode_key(tmp_path, "extra")
    assert serialization.load_ssh_private_key(private.read_bytes(), None).public_key() == \
        serialization.load_ssh_public_key(public.read_bytes())


def test_bundle_load_names_missing_files(bundle: CertBundle, tmp_path: Path) -> None:
    assert CertBundle.load(bundle.root) == bundle
    with pytest.raises(CertsError, match="missing ca.crt, superlink.crt, superlink.key"):
        CertBundle.load(tmp_path)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="genofed")
    certs_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_writes_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "creds"
    args = _cli(["certs", "--out", str(out), "--sites", "2", "--host", "10.0.0.9", "--days", "7"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "2 SuperNode keys (site-1..site-2)" in printed and "README.txt" in printed
    san = _cert(out / "superlink.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.9") in san.get_values_for_type(x509.IPAddress)
    again = _cli(["certs", "--out", str(out), "--sites", "2"])
    with pytest.raises(CertsError, match="refusing to overwrite"):
        again.func(again)
