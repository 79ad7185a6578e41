"""The one SuperLink launcher of ``genofed simulate`` and the deployment harness."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from server.certs import CertBundle, generate_certs
from simulations.superlink import SuperLinkConfig, SuperLinkError, free_port, spawn, start_superlink, stop, wait_healthy
from simulations.simulate import _env


def test_a_process_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    proc = spawn([sys.executable, "-c", "print('boom: cannot start'); raise SystemExit(3)"], home=tmp_path,
                 env=os.environ, log_path=log)
    with pytest.raises(SuperLinkError, match=r"(?s)exited with code 3 before becoming healthy; see .*x.log.*boom"):
        wait_healthy(proc, SuperLinkConfig(free_port()), log_path=log, deadline=time.monotonic() + 30)
    assert log.read_text().startswith(f"# {sys.executable} -c")


def test_simulation_and_tls_superlinks_start_healthy_and_stop(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path / "certs", sites=1)
    taken: set[int] = set()
    for name, make in (("sim", lambda port: SuperLinkConfig(port, simulation=True)),
                       ("tls", lambda port: SuperLinkConfig(port, certs=certs, supernode_auth=True))):
        home = tmp_path / name
        proc, config = start_superlink(home, env=_env(home), config_for=make, taken=taken)
        try:
            assert proc.poll() is None and config.port in taken
            assert ("--insecure" in config.argv()) == (name == "sim")
            assert config.cli_config("x").count(config.address) == 1
        finally:
            stop(proc, grace=10)
        assert proc.poll() is not None
        assert (home / "superlink.log").read_text().startswith("# flower-superlink")


def test_missing_tls_files_are_one_summary_line_and_nothing_starts(tmp_path: Path) -> None:
    missing = CertBundle(root=tmp_path / "nowhere", sites=())
    with pytest.raises(SuperLinkError) as err:
        start_superlink(tmp_path / "home", env=_env(tmp_path / "home"), timeout=60,
                        config_for=lambda port: SuperLinkConfig(port, certs=missing))
    assert "\n" not in err.value.summary and err.value.summary.endswith("superlink.log")
    assert f"TLS file(s) missing: {missing.ca_cert}" in err.value.summary
    assert not (tmp_path / "home" / "superlink.log").exists()


def test_a_real_superlink_that_exits_is_one_summary_line_and_its_log(tmp_path: Path) -> None:
    """A SQLite path in a missing folder: flower-superlink itself refuses to start."""
    with pytest.raises(SuperLinkError) as err:
        start_superlink(tmp_path / "home", env=_env(tmp_path / "home"), timeout=60,
                        config_for=lambda port: SuperLinkConfig(port, simulation=True,
                                                                database=tmp_path / "no" / "such" / "state.db"))
    assert "\n" not in err.value.summary and "exited with code" in err.value.summary
    assert "last lines:" in str(err.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 and /proc are Linux's")
def test_a_superlink_on_another_address_through_a_command_prefix(tmp_path: Path) -> None:
    """The seams tests/test_network_partition.py uses: a bind address its certificate names, and a
    command prefix (there ``ip netns exec NS``) that the health check goes through too."""
    certs = generate_certs(tmp_path / "certs", sites=1, hosts=["127.0.0.2"])
    home = tmp_path / "prefixed"
    prefix = ("env", "GENOFED_VIA_PREFIX=1")  # env execs the SuperLink: same pid, marked environment

    def make(port: int) -> SuperLinkConfig:
        return SuperLinkConfig(port, certs=certs, supernode_auth=True, host="127.0.0.2", prefix=prefix)

    proc, config = start_superlink(home, env=_env(home), config_for=make)
    try:
        assert config.command() == [*prefix, *config.argv()] and config.address == f"127.0.0.2:{config.port}"
        assert "--host 127.0.0.2" in " ".join(config.argv())
        assert b"GENOFED_VIA_PREFIX=1" in Path(f"/proc/{proc.pid}/environ").read_bytes()
    finally:
        stop(proc, grace=10)
