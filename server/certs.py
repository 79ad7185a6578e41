"""Deployment credentials: a CA, the SuperLink's TLS certificate and one SuperNode key per site.

``generate_certs(out, sites=N)`` writes, with the ``cryptography`` package only (no openssl or
ssh-keygen)::

    out/
      README.txt          which file goes where
      ca.crt              the federation's CA certificate (every party gets it)
      ca.key              the CA's private key (0600; stays with the coordinator, offline if possible)
      superlink.crt       the SuperLink's TLS certificate, signed by the CA
      superlink.key       its private key (0600; stays on the SuperLink host)
      sites/site-<i>      site i's SuperNode authentication key: OpenSSH-format EC P-384 (0600)
      sites/site-<i>.pub  its OpenSSH public key, which the coordinator registers

Keys and certificates:

- CA and SuperLink keys are EC P-384 with ECDSA-SHA384 signatures; the CA certificate has
  ``basicConstraints CA:TRUE, pathlen:0`` and ``keyUsage keyCertSign, cRLSign`` (both critical);
  the SuperLink certificate has ``CA:FALSE``, ``keyUsage digitalSignature`` (critical, enough for
  ECDHE key exchange), ``extendedKeyUsage serverAuth``, subject/authority key identifiers, and
  SANs ``localhost``, ``127.0.0.1``, ``::1`` plus every extra host (an IP address becomes an IP
  SAN, anything else a DNS SAN). These also pass Python 3.13's strict X.509 checks.
- SuperNode keys are what Flower 1.42 reads: ``flower-supernode --auth-supernode-private-key``
  loads the file with ``cryptography``'s ``load_ssh_private_key`` and requires an EC key, and
  ``flwr supernode register`` loads the ``.pub`` file with ``load_ssh_public_key`` and requires a
  NIST curve (checked in ``flwr/supernode/cli/flower_supernode.py`` and
  ``flwr/cli/supernode/register.py``). The keys carry no passphrase, as Flower cannot take one.

The whole directory is built in a hidden temporary sibling and renamed into place, so ``out``
either holds a complete set or does not exist; an existing non-empty ``out`` is never touched.

A site can also make its own key pair, so that its private key never leaves its machine:
:func:`write_supernode_key` there (``genofed certs --site-key NAME``), then, at the coordinator,
:func:`add_site_public_key` files only the public key as ``out/sites/NAME.pub``
(``genofed certs --register NAME.pub``), refusing anything that holds a private key. A
credentials folder may thus hold public keys without their private keys.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import durable
from common.errors import GenofedError
from common.site_names import natural_key

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""SANs every SuperLink certificate carries, so that a local deployment works out of the box."""
DEFAULT_DAYS = 365
MAX_SITES = 1000
CURVE = ec.SECP384R1
CLOCK_SKEW = _dt.timedelta(minutes=5)
"""Certificates are valid from this long before their creation, for hosts whose clocks lag."""

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertsError(GenofedError):
    """Bad arguments to ``genofed certs`` or an output folder that must not be touched."""


@dataclass(frozen=True)
class CertBundle:
    """The files of one credentials folder (as written by :func:`generate_certs`)."""

    root: Path
    sites: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def site_key(self, site: str | int) -> Path:
        """Private SuperNode key of ``site`` (a name such as ``"site-2"`` or its number ``2``)."""
        return self.root / "sites" / _site_name(site)

    def site_public_key(self, site: str | int) -> Path:
        """OpenSSH public key of ``site``, the file ``flwr supernode register`` takes."""
        return self.root / "sites" / f"{_site_name(site)}.pub"

    @classmethod
    def load(cls, root: Path | str) -> CertBundle:
        """Describe an existing credentials folder; raises :class:`CertsError` if files are missing.

        ``sites`` lists every ``sites/*.pub``; a site's private key may be absent (it stays at the site).
        """
        root = Path(root).expanduser().resolve()
        sites_dir = root / "sites"
        names = sorted((p.stem for p in sites_dir.glob("*.pub")), key=natural_key) \
            if sites_dir.is_dir() else []
        bundle = cls(root=root, sites=tuple(names))
        # Site private keys are not required: a site that made its own key pair sent only its .pub.
        required = [bundle.ca_cert, bundle.server_cert, bundle.server_key]
        missing = [str(p.relative_to(root)) for p in required if not p.is_file()]
        if missing:
            raise CertsError(f"{root}: not a complete credentials folder (missing {', '.join(missing)}); "
                             "make one with `genofed certs`")
        return bundle


def generate_certs(out: Path | str, *, sites: int, hosts: Iterable[str] = (), days: int = DEFAULT_DAYS) -> CertBundle:
    """Write a CA, a SuperLink certificate and ``sites`` SuperNode key pairs into a new folder ``out``.

    Parameters
    ----------
    out : path
        Folder to create. It must not exist, or be an empty folder; its parent is created if needed.
    sites : int
        Number of hospitals; keys are named ``site-1`` .. ``site-<sites>``.
    hosts : iterable of str
        Extra names or IP addresses under which SuperNodes reach the SuperLink (its SANs);
        ``localhost``, ``127.0.0.1`` and ``::1`` are always included.
    days : int
        Validity of both certificates, in days.

    Returns
    -------
    CertBundle
        Paths of the written files.

    Raises
    ------
    CertsError
        On invalid arguments or when ``out`` exists and is not an empty folder.
    """
    out = Path(out).expanduser().absolute()
    if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= MAX_SITES:
        raise CertsError(f"--sites must be a whole number from 1 to {MAX_SITES}, not {sites!r}")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
        raise CertsError(f"--days must be a whole number from 1 to 36500, not {days!r}")
    san_names = _subject_alt_names([*DEFAULT_HOSTS, *hosts])
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    try:
        now = _dt.datetime.now(_dt.timezone.utc)
        not_before, not_after = now - CLOCK_SKEW, now + _dt.timedelta(days=days)
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _ca_certificate(ca_key, not_before, not_after)
        server_key = ec.generate_private_key(CURVE())
        server_cert = _server_certificate(server_key, ca_key, ca_cert, san_names, not_before, not_after)

        _write(tmp / "ca.key", _pem_private(ca_key), private=True)
        _write(tmp / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(tmp / "superlink.key", _pem_private(server_key), private=True)
        _write(tmp / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM))
        (tmp / "sites").mkdir(mode=0o700)
        names = tuple(f"site-{i}" for i in range(1, sites + 1))
        fingerprints = {}
        for name in names:
            _, public = write_supernode_key(tmp / "sites", name)
            fingerprints[name] = ssh_fingerprint(public.read_bytes())
        _write(tmp / "README.txt", _readme(names, [str(n) for n in _san_strings(san_names)], not_after,
                                           fingerprints, ca_fingerprint=cert_fingerprint(ca_cert)).encode())
        durable.fsync_dir(tmp / "sites")
        durable.fsync_dir(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    durable.fsync_dir(out.parent)
    return CertBundle(root=out, sites=names)


def write_supernode_key(folder: Path | str, name: str) -> tuple[Path, Path]:
    """Write one SuperNode key pair: ``folder/name`` (OpenSSH EC P-384 private key, 0600) and ``name.pub``.

    This is what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    take. Existing files are never overwritten (:class:`CertsError`). Returns (private, public).
    """
    folder = Path(folder)
    _check_key_name(name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = folder / name, folder / f"{name}.pub"
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        _write(private_path, private, private=True)
        _write(public_path, public + f" genofed-{name}\n".encode())
    except FileExistsError as exc:
        raise CertsError(f"{exc.filename}: exists; refusing to overwrite a key") from None
    return private_path, public_path


NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""Curves of the SuperNode keys ``flwr supernode register`` accepts (1.42: NIST P-256, P-384, P-521)."""
MAX_PUBLIC_KEY_BYTES = 16 * 1024


def read_site_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    """The OpenSSH EC public key in ``path``, as ``flwr supernode register`` needs it.

    Raises
    ------
    CertsError
        One line: the file is missing, holds a private key (which must stay at the site), or is
        not an OpenSSH EC public key on a NIST curve.
    """
    path = Path(path)
    try:
        data = path.read_bytes()[:MAX_PUBLIC_KEY_BYTES + 1]
    except OSError as exc:
        raise CertsError(f"{path}: cannot read the public key ({exc.strerror})") from None
    if b"PRIVATE KEY" in data:
        # Someone sent the wrong file: say so, and never copy it anywhere.
        raise CertsError(f"{path}: is a PRIVATE key; it must never leave the site: ask the site for its .pub "
                         "file, and have it make a new key pair (`genofed certs --site-key NAME`) since this "
                         "one has been exposed")
    try:
        if len(data) > MAX_PUBLIC_KEY_BYTES:
            raise ValueError("too large")
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise CertsError(f"{path}: not an OpenSSH public key line (e.g. 'ecdsa-sha2-nistp384 AAAA...'); "
                         "send the .pub file `genofed certs --site-key` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise CertsError(f"{path}: not an EC key on a NIST curve, which Flower's SuperNode authentication "
                         "requires; make one with `genofed certs --site-key NAME`")
    return key


def add_site_public_key(out: Path | str, public_key: Path | str, name: str | None = None) -> Path:
    """File a site's public key as ``out/sites/NAME.pub`` in the credentials folder ``out``.

    Parameters
    ----------
    out : path
        A credentials folder written by :func:`generate_certs`.
    public_key : path
        The site's OpenSSH public key (``NAME.pub`` from ``genofed certs --site-key NAME``).
    name : str, optional
        The site's name; by default the key file's name without ``.pub``.

    Returns
    -------
    Path
        The filed public key. Only the public key is written (re-encoded), never the input file.

    Raises
    ------
    CertsError
        If ``out`` is not a credentials folder, the key is not an acceptable public key (or is a
        private key), the name is taken by another key, or the same key is filed under another name.
    """
    bundle = CertBundle.load(out)
    key = read_site_public_key(public_key)
    source = Path(public_key)
    name = name or (source.name[:-4] if source.name.endswith(".pub") else source.name)
    _check_key_name(name)  # before it becomes a path: no "../"
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fingerprint = ssh_fingerprint(line)
    target = bundle.site_public_key(name)
    for other in bundle.sites:
        if other != name and ssh_fingerprint(bundle.site_public_key(other).read_bytes()) == fingerprint:
            raise CertsError(f"{public_key}: this key is already filed as {bundle.site_public_key(other)}; "
                             "every site needs its own key")
    if target.is_file():
        if ssh_fingerprint(target.read_bytes()) == fingerprint:
            return target  # the same key again: nothing to do
        raise CertsError(f"{target}: another key is filed under the name {name!r}; choose another --name")
    (bundle.root / "sites").mkdir(mode=0o700, exist_ok=True)
    _write(target, line + f" genofed-{name}\n".encode())
    durable.fsync_dir(target.parent)
    return target


def check_certificate_dates(path: Path | str, *, now: _dt.datetime | None = None) -> x509.Certificate:
    """The certificate in ``path`` if it is valid now; one-line :class:`CertsError` if expired or not yet valid."""
    path = Path(path)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise CertsError(f"{path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, and "
                         "SuperNodes refuse it; make new credentials with `genofed certs`")
    if cert.not_valid_before_utc > now:
        raise CertsError(f"{path}: certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                         "UTC; check this host's clock")
    return cert


def ssh_fingerprint(public_key: bytes | str) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of an OpenSSH public key line (as ``ssh-keygen -l`` prints)."""
    line = public_key.decode() if isinstance(public_key, bytes) else public_key
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, colon-separated hex (as ``openssl x509 -fingerprint`` prints)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


# ---------------------------------------------------------------------------------------------
# Certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genofed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(key: ec.EllipticCurvePrivateKey, not_before: _dt.datetime,
                    not_after: _dt.datetime) -> x509.Certificate:
    name = _name("genofed federation CA")
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, san_names: list[x509.GeneralName],
                        not_before: _dt.datetime, not_after: _dt.datetime) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name("genofed SuperLink")).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts`` in order, without duplicates; IPs as IP SANs, the rest as DNS SANs."""
    names: list[x509.GeneralName] = []
    for raw in hosts:
        host = str(raw).strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # "[::1]" as written in addresses
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(_check_dns_name(host).lower())
        if entry not in names:
            names.append(entry)
    return names


def _check_dns_name(host: str) -> str:
    if not host:
        raise CertsError("--host must not be empty")
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) or (i == 0 and label == "*")
                                  for i, label in enumerate(labels)):
        raise CertsError(f"--host {host!r} is neither an IP address nor a valid DNS name "
                         "(letters, digits and hyphens, dot-separated; no port, no scheme)")
    return host.rstrip(".")


def _san_strings(names: list[x509.GeneralName]) -> list[str]:
    return [str(n.value) for n in names]


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---------------------------------------------------------------------------------------------
# Files


def _check_key_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name.endswith(".pub"):
        raise CertsError(f"SuperNode key name {name!r}: use letters, digits, '-', '_' and '.' (no .pub ending)")


def _site_name(site: str | int) -> str:
    if isinstance(site, int) and not isinstance(site, bool):
        return f"site-{site}"
    return str(site)


def _check_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CertsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise CertsError(f"{out}: folder exists and is not empty; refusing to overwrite credentials "
                         "(choose another --out, or remove the old folder first)")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (an empty ``out`` is replaced; anything else is kept)."""
    try:
        os.rename(tmp, out)  # atomic; replaces ``out`` only if it is an empty directory
    except OSError as exc:
        raise CertsError(f"{out}: could not move the new credentials into place ({exc.strerror}); "
                         "nothing was written") from None


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    durable.write_new(path, data, mode=0o600 if private else 0o644)


def _readme(names: Sequence[str], sans: Sequence[str], not_after: _dt.datetime,
            fingerprints: dict[str, str], *, ca_fingerprint: str) -> str:
    sites = "\n".join(f"  sites/{n:<12} sites/{n}.pub   {fingerprints[n]}" for n in names)
    return f"""\
genofed deployment credentials (written by `genofed certs`)
==========================================================

Certificates expire on {not_after:%Y-%m-%d} (UTC). The SuperLink certificate is valid for:
  {", ".join(sans)}
SuperNodes must reach the SuperLink under one of these names (rerun `genofed certs --host NAME`
to add the coordinator's public name or IP).

CA certificate SHA-256 fingerprint (compare it out of band when handing ca.crt over):
  {ca_fingerprint}

Which file goes where
---------------------
Coordinator, SuperLink host:
  ca.crt, superlink.crt, superlink.key
    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt \\
        --ssl-keyfile superlink.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation --database state.db

Coordinator, `flwr` CLI: ca.crt, and every sites/site-<i>.pub to register:
    # $FLWR_HOME/config.toml (default ~/.flwr/config.toml)
    [superlink.genofed]
    address = "<superlink-host>:8000"
    root-certificates = "/absolute/path/to/ca.crt"

    flwr supernode register sites/site-1.pub genofed --name site-1   # one per site

Each hospital i gets exactly two files: ca.crt and its own private key sites/site-<i>
(never another site's key, never ca.key):
    flower-supernode --superlink <superlink-host>:8000 --root-certificates ca.crt \\
        --auth-supernode-private-key site-<i> \\
        --node-config 'vault="/abs/vault" key-file="/abs/vault.key"'

Keep offline, with the coordinator only:
  ca.key  (signs new SuperLink certificates; not needed to run the federation)

SuperNode keys (private key, public key to register, OpenSSH SHA256 fingerprint):
{sites}

Private keys (ca.key, superlink.key, sites/site-<i>) are readable only by their owner (mode 0600)
and carry no passphrase: protect them with file permissions and copy them over secure channels.
An unregistered key is refused by the SuperLink ("Failed to activate SuperNode"); genofed refuses a
private key file other users can read (fix: chmod 600 FILE).

A site may instead make its own key pair, so its private key never leaves it:
    genofed certs --site-key site-<i> --out DIR                  # at the site; send DIR/site-<i>.pub
    genofed certs --register site-<i>.pub --out <this folder> --connection genofed   # here
"""
