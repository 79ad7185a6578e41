"""Transport attacks against a real TLS SuperLink with SuperNode authentication (Flower 1.42).

Each attack runs against a real ``flower-superlink`` (TLS, ``--enable-supernode-auth``) started
by the deployment harness, and each refusal is proved by evidence, not by a timeout: the
attacker's own log (Flower's exit code 305 and the reason: no HTTP response on a plain
connection, ``CERTIFICATE_VERIFY_FAILED``, "certificate has expired", "Failed to activate
SuperNode"), genofed's one-line error, and the SuperLink's node list, where the legitimate
site-1 is ``online`` and the registered site-2, whose key the attacks borrow, never is.

The tests marked ``attack`` start processes (``make test-attacks``); they share one SuperLink.
The others are fast checks of the same guards without processes (``make test``).
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.keyfiles import KeyFilePermissionError, check_private_file
from server import certs_cli
from server.certs import CertBundle, CertsError, add_site_public_key, generate_certs, write_supernode_key
from simulations.deployment import LocalDeployment, ManagedProcess
from simulations.process_tree import pids_with_environ
from simulations.superlink import SuperLinkConfig, free_port, start_superlink

ON_LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness reads /proc")
ROGUE_EXIT_S = 30.0
"""An attacker's SuperNode gives up after 2 retries (about 1-3 s measured); this only bounds a hang."""
REFUSED_305 = "Exit Code: 305"
"""Flower's "SuperNode could not connect / was refused" exit code, logged before the process exits with 1."""


# ---------------------------------------------------------------------------------------------
# The shared SuperLink


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """A TLS + SuperNode-auth SuperLink; site-1 registered and online, site-2 registered only.

    site-2's key is what the transport attacks borrow: it is registered, so a refusal with it
    is the transport's doing, and it must never show up ``online``.
    """
    workdir = tmp_path_factory.mktemp("transport") / "deploy"
    with LocalDeployment(workdir, sites=2, warm=False) as dep:
        dep.start(["site-1"], timeout=90)
        dep.register_supernode(dep.certs.site_public_key(2), name="site-2")
        yield dep
    assert pids_with_environ(str(workdir).encode()) == [], "processes outlived the deployment"


def _rogue(dep: LocalDeployment, name: str, *, trust: list[str], key: Path | None) -> ManagedProcess:
    """Start a stock ``flower-supernode`` against the deployment's SuperLink; the harness kills it at teardown.

    ``--isolation process`` starts no SuperExec (nothing to outlive it) and two retries make a
    refused node exit in seconds.
    """
    home = dep.workdir / "rogues" / name
    home.mkdir(parents=True)
    argv = ["flower-supernode", "--superlink", dep.address, *trust, "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(free_port(dep._reserved_ports)),
            "--max-retries", "2", "--max-wait-time", "15"]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    return dep._launch(f"rogue SuperNode {name}", argv, home, home / "supernode.log", 0)


NO_HTTP_ANSWER = ("Server disconnected without sending a response", "[Errno 104] Connection reset by peer")


def _refused(node: ManagedProcess) -> str:
    """Wait for an attacker's SuperNode to give up; returns its log after checking Flower's refusal."""
    assert node.wait_exit(ROGUE_EXIT_S) == 1, node.log_tail()
    log = node.log_text()
    assert REFUSED_305 in log and "SuperNode ID:" not in log, node.log_tail()
    return log


def _assert_site2_never_joined(dep: LocalDeployment) -> dict[int, str]:
    """The SuperLink's node list: site-1 online, site-2 not, and no node it was not told about."""
    statuses = dep.supernode_statuses()
    assert set(statuses) == set(dep.node_ids.values()), statuses
    assert statuses[dep.node_ids["site-1"]] == "online", statuses
    assert statuses[dep.node_ids["site-2"]] != "online", statuses
    return statuses


def _access_lines(dep: LocalDeployment, path: str) -> int:
    """How many requests to ``path`` the SuperLink answered (uvicorn's access log)."""
    assert dep.superlink is not None
    return sum(1 for line in dep.superlink.log_text().splitlines() if f" {path} HTTP/" in line)


# ---------------------------------------------------------------------------------------------
# 1. Plain connections


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(120)
def test_plain_supernode_never_joins(link: LocalDeployment) -> None:
    log = _refused(_rogue(link, "plain", trust=["--insecure"], key=None))
    assert "Starting insecure channel" in log
    # No HTTP answer over plain TCP: the TLS SuperLink drops the connection, which the client reports
    # as a disconnect or, when the reset arrives first, as a reset (both seen on these machines).
    assert any(s in log for s in NO_HTTP_ANSWER), log
    _assert_site2_never_joined(link)


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(120)
def test_plain_control_api_calls_fail(link: LocalDeployment, tmp_path: Path) -> None:
    """``flwr`` with ``insecure = true`` gets no answer; the SuperLink never serves it; TLS does."""
    home = tmp_path / "plain-cli"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
                                      f'address = "{link.address}"\ninsecure = true\n')
    served = _access_lines(link, "/v1/control/list-nodes")
    out = subprocess.run(["flwr", "supernode", "ls", "plain", "--format", "json"], capture_output=True, text=True,
                         env={**link.env, "FLWR_HOME": str(home)}, timeout=60, stdin=subprocess.DEVNULL)
    assert '"success": false' in out.stdout and "Connection to the SuperLink is unavailable" in out.stdout, out
    assert _access_lines(link, "/v1/control/list-nodes") == served  # the request never reached the API

    with pytest.raises(http.client.RemoteDisconnected):  # what the plain request above met
        urllib.request.urlopen(f"http://{link.address}/health", timeout=10)
    context = ssl.create_default_context(cafile=str(link.certs.ca_cert))
    with urllib.request.urlopen(f"https://{link.address}/health", context=context, timeout=10) as ok:
        assert ok.status == 200  # the same port answers over TLS


# ---------------------------------------------------------------------------------------------
# 2. Keys and certificates


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(120)
def test_unregistered_key_is_refused(link: LocalDeployment) -> None:
    intruder, _ = link.new_supernode_key("intruder")
    log = _refused(_rogue(link, "unregistered", trust=["--root-certificates", str(link.certs.ca_cert)],
                          key=intruder))
    assert "Failed to activate SuperNode" in log  # TLS was fine: the SuperLink refused the key
    _assert_site2_never_joined(link)


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(120)
def test_supernode_trusting_another_ca_is_refused(link: LocalDeployment, tmp_path: Path) -> None:
    """A SuperNode that trusts another CA (or meets an impostor SuperLink) stops at the handshake."""
    other = generate_certs(tmp_path / "other", sites=1)
    log = _refused(_rogue(link, "wrong-ca", trust=["--root-certificates", str(other.ca_cert)],
                          key=link.certs.site_key(2)))
    assert "SSL/TLS handshake error detected" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log and "unable to get local issuer certificate" in log
    _assert_site2_never_joined(link)


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(150)
def test_expired_superlink_certificate_is_refused(tmp_path: Path) -> None:
    """genofed's launcher refuses an expired certificate; a SuperLink run with one anyway is refused by SuperNodes."""
    bundle = generate_certs(tmp_path / "expired", sites=1)
    _write_expired_server_certificate(bundle)
    with LocalDeployment(tmp_path / "deploy", certs=bundle, warm=False) as dep:
        with pytest.raises(CertsError, match=r"superlink\.crt: certificate expired on .* make new credentials"):
            dep.start_superlink()
        home = dep.workdir / "superlink"
        assert dep.superlink is None and not (home / "superlink.log").exists()  # nothing was started
        # Started by hand, as someone ignoring the launcher would.
        config = SuperLinkConfig(free_port(dep._reserved_ports), certs=bundle, supernode_auth=True)
        home.mkdir(parents=True, exist_ok=True)
        dep.superlink = dep._launch("expired SuperLink", config.argv(), home, home / "superlink.log", config.port)
        _wait_for_log(dep.superlink, f"Uvicorn running on https://{config.address}", timeout=60)

        context = ssl.create_default_context(cafile=str(bundle.ca_cert))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED.*certificate has expired"):
            urllib.request.urlopen(f"https://{config.address}/health", context=context, timeout=10)
        log = _refused(_rogue(dep, "meets-expired", trust=["--root-certificates", str(bundle.ca_cert)],
                              key=bundle.site_key(1)))
        assert "CERTIFICATE_VERIFY_FAILED" in log and "certificate has expired" in log
    assert pids_with_environ(str(tmp_path / "deploy").encode()) == [], "processes outlived the deployment"


def _write_expired_server_certificate(bundle: CertBundle) -> None:
    """Replace the bundle's SuperLink certificate by one its CA signed, valid 30 days until yesterday."""
    ca_key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    server_key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey) and isinstance(server_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "genofed SuperLink")]))
            .issuer_name(ca_cert.subject).public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=31)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    bundle.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _wait_for_log(proc: ManagedProcess, needle: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.log_text():
        assert proc.alive(), proc.log_tail()
        assert time.monotonic() < deadline, f"{needle!r} not logged in {timeout:.0f} s:\n{proc.log_tail()}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# 3. Key files other users can read


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(120)
def test_genofed_supernode_refuses_loose_key_files(link: LocalDeployment, tmp_path: Path) -> None:
    """Mode 0644 on the authentication key, then on the vault key: one line naming the file and the fix."""
    from client.vault import KeySource, Vault, generate_key_file

    vault_key = generate_key_file(tmp_path / "vault.key")
    Vault.create(tmp_path / "vault", KeySource.from_key_file(vault_key), {})
    auth_key = tmp_path / "site-2"
    shutil.copyfile(link.certs.site_key(2), auth_key)
    node_config = f'vault="{tmp_path / "vault"}" key-file="{vault_key}" site="site-2"'

    for loose, what in ((auth_key, "SuperNode authentication key"), (vault_key, "vault key file")):
        for path in (auth_key, vault_key):
            path.chmod(0o644 if path == loose else 0o600)
        out = subprocess.run(
            ["genofed", "supernode", "--superlink", link.address, "--root-certificates", str(link.certs.ca_cert),
             "--auth-supernode-private-key", str(auth_key), "--node-config", node_config,
             "--port", str(free_port(link._reserved_ports))],
            capture_output=True, text=True, env={**link.env, "FLWR_HOME": str(tmp_path)}, timeout=60,
            stdin=subprocess.DEVNULL)
        assert out.returncode == 1, out
        assert out.stderr.splitlines() == [
            f"genofed: error: {loose}: {what} is accessible by other users (mode 0644); refusing to use it: "
            f"run `chmod 600 {loose}`"], out.stderr
        assert "starting the SuperNode" not in out.stdout
    _assert_site2_never_joined(link)


def test_superlink_launcher_refuses_a_loose_tls_key(tmp_path: Path) -> None:
    bundle = generate_certs(tmp_path / "creds", sites=1)
    bundle.server_key.chmod(0o640)
    home = tmp_path / "home"
    with pytest.raises(KeyFilePermissionError) as err:
        start_superlink(home, env=os.environ, config_for=lambda port: SuperLinkConfig(port, certs=bundle))
    assert str(err.value) == (f"{bundle.server_key}: SuperLink TLS private key is accessible by other users "
                              f"(mode 0640); refusing to use it: run `chmod 600 {bundle.server_key}`")
    assert not (home / "superlink.log").exists()  # nothing was started


def test_private_flower_options_are_found_even_abbreviated() -> None:
    from client.supernode_cli import private_flower_files

    argv = ["--superlink", "h:1", "--auth-supernode-priv", "/k", "--appio-ssl-keyfile=/t", "--insecure"]
    assert private_flower_files(argv) == [("/k", "SuperNode authentication key"), ("/t", "Runtime API TLS key")]
    assert private_flower_files(["--root-certificates", "/ca.crt"]) == []


def test_owner_only_files_pass(tmp_path: Path) -> None:
    key, _ = write_supernode_key(tmp_path, "k")
    check_private_file(key, "key")
    check_private_file(tmp_path / "missing", "key")  # the reader names a missing file, not this check
    key.chmod(0o400)
    check_private_file(key, "key")


# ---------------------------------------------------------------------------------------------
# 4. A site's key made at the site, only its public key registered


@ON_LINUX
@pytest.mark.attack
@pytest.mark.timeout(150)
def test_site_made_key_is_registered_by_its_public_key_alone(link: LocalDeployment, tmp_path: Path) -> None:
    site_dir, creds = tmp_path / "st-mary", link.certs.root
    env = {**link.env, "FLWR_HOME": str(link.cli_home)}
    made = _genofed(["certs", "--site-key", "st-mary", "--out", str(site_dir)], env)
    private, public = site_dir / "st-mary", site_dir / "st-mary.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    secret = private.read_bytes()
    assert public.read_text().strip() in made and "PRIVATE KEY" not in made

    # What travels: the .pub file alone (copied to the coordinator's inbox).
    inbox = tmp_path / "coordinator-inbox"
    inbox.mkdir()
    shutil.copy(public, inbox / public.name)
    registered = _genofed(["certs", "--register", str(inbox / public.name), "--out", str(creds),
                           "--connection", link.connection], env)
    node_id = int(registered.rsplit("node id ", 1)[1].split()[0])
    assert (creds / "sites" / "st-mary.pub").is_file() and not (creds / "sites" / "st-mary").exists()
    holders = [p for p in creds.rglob("*") if p.is_file() and secret.strip() in p.read_bytes()]
    assert holders == [], f"the site's private key appeared at the coordinator: {holders}"

    link.node_ids["st-mary"] = node_id
    link.start_supernode("st-mary", private_key=private, node_config={"site": "st-mary"})
    link.wait_supernodes_online(["st-mary"], timeout=60)
    assert link.supernode_statuses()[node_id] == "online"


def _genofed(argv: list[str], env: dict[str, str]) -> str:
    """Run the ``genofed`` console script; returns its stdout (it must succeed)."""
    out = subprocess.run(["genofed", *argv], capture_output=True, text=True, env=env, timeout=90,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out
    return out.stdout


def test_register_refuses_a_private_key_and_files_only_the_public_one(tmp_path: Path) -> None:
    creds = generate_certs(tmp_path / "creds", sites=1)
    private, public = write_supernode_key(tmp_path / "site", "st-anne")
    before = sorted(p.name for p in (creds.root / "sites").iterdir())
    with pytest.raises(CertsError, match=r"is a PRIVATE key; it must never leave the site"):
        add_site_public_key(creds.root, private)
    assert sorted(p.name for p in (creds.root / "sites").iterdir()) == before
    filed = add_site_public_key(creds.root, public)
    assert filed == creds.root / "sites" / "st-anne.pub" and filed.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert add_site_public_key(creds.root, public) == filed  # the same key again is a no-op
    with pytest.raises(CertsError, match="already filed as"):
        add_site_public_key(creds.root, public, name="st-other")
    assert CertBundle.load(creds.root).sites == ("site-1", "st-anne")  # a public key without its private key


def test_certs_help_and_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="genofed")
    certs_cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["certs", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--site-key NAME", "--register NAME.pub", "--connection CONN", "never leaves the site",
                   "a private key is refused"):
        assert needle in text, needle
    args = parser.parse_args(["certs", "--site-key", "st-x", "--out", str(tmp_path / "s"), "--days", "3"])
    with pytest.raises(CertsError, match="--host and --days go with --sites"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["certs", "--out", str(tmp_path), "--sites", "2", "--site-key", "x"])
