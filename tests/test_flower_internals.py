"""Flower's internal modules that genofed relies on (common/flower_internals.py), and the pieces
of the warm site daemon that need no deployment: these fail loudly if Flower changes under us.

The warm daemon end to end (a real SuperLink and SuperNodes over TLS) is in
tests/test_warm_node.py and tests/test_deployment.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.vault import KeySource, Vault, generate_key_file
from common import flower_internals as fi
from server.exchange import POLL_S, PollingGrid


def test_every_internal_flower_piece_is_what_1_42_had() -> None:
    flw = fi.check_flower_internals(supernode=True)
    # The SuperNode's poll loop and reply wait (start_client_internal: time.sleep(3) / (0.5)).
    source = Path(flw.start_client_internal.__file__).read_text()
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    # What flwr-clientapp does for one task, which run_task repeats in a warm process.
    clientapp = Path(flw.run_clientapp.__file__).read_text()
    for step in ("pull_task_input(client)", "install_from_fab(fab.content", "load_client_app_fn(",
                 "client_app(message=message, context=context)", "push_message(client, reply_message, context)",
                 "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"):
        assert step in clientapp, step
    assert flw.inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] >= 0.0


def test_a_changed_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.delattr(run_clientapp, "push_task_output")
    with pytest.raises(fi.FlowerInternalsChanged, match="run_clientapp.push_task_output is gone.*1.42"):
        fi.check_flower_internals()


def test_the_secure_sum_building_blocks_are_what_1_42_had() -> None:
    flw = fi.check_secagg_internals()
    shares = flw.create_shares(b"0123456789abcdef", 3, 5)
    assert len(shares) == 5 and flw.combine_shares(shares[1:4]) == b"0123456789abcdef"
    a, b = flw.generate_key_pairs(), flw.generate_key_pairs()
    key = flw.generate_shared_key(a[0], b[1])
    assert key == flw.generate_shared_key(b[0], a[1])  # ECDH agrees both ways
    assert flw.decrypt(key, flw.encrypt(key, b"share")) == b"share"
    pub = flw.public_key_to_bytes(a[1])
    assert flw.public_key_to_bytes(flw.bytes_to_public_key(pub)) == pub


def test_a_changed_secure_sum_building_block_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.secure_aggregation.crypto import shamir

    monkeypatch.setattr(shamir, "create_shares", lambda secret, threshold: [])
    with pytest.raises(fi.FlowerInternalsChanged, match=r"create_shares takes \('secret', 'threshold'\)"):
        fi.check_secagg_internals()
    monkeypatch.delattr(shamir, "combine_shares")
    with pytest.raises(fi.FlowerInternalsChanged, match="secure aggregation modules changed.*1.42"):
        fi.check_secagg_internals()


def test_the_control_client_sends_what_flwr_run_ls_and_stop_send() -> None:
    flw = fi.check_control_internals()
    cli = Path(flw.build_fab_from_disk.__code__.co_filename).parent
    run = (cli / "run" / "run.py").read_text()
    for step in ("fab_bytes = build_fab_from_disk(app)", "fab_hash = hashlib.sha256(fab_bytes).hexdigest()",
                 "Fab(fab_hash, fab_bytes, {})", "fab=fab_to_proto(fab)",
                 "override_config=user_config_to_proto(parse_config_args(config_overrides))",
                 "tmp_dict = {k.replace(\"-\", \"_\"): v for k, v in tmp_dict.items()}",
                 "simulation_config_from_json(tmp_dict)", "control_client.StartRun(req)"):
        assert step in run, step
    utils = (cli / "utils.py").read_text()
    assert "CliClientHttpInterceptor()," in utils and 'RuntimeVersionHttpInterceptor(component_name="flwr CLI")' in utils
    assert "stub.ListRuns(ListRunsRequest(run_id=run_id))" in (cli / "ls.py").read_text()
    assert 'status_text = f"{run.status.status}:{run.status.sub_status}"' in (cli / "run_utils.py").read_text()


@pytest.mark.slow
def test_the_fab_from_the_include_patterns_is_the_fab_flwr_run_builds() -> None:
    from simulations.simulate import APP_DIR

    flw = fi.check_control_internals()
    ours = flw.build_fab_from_files(fi.fab_candidates(APP_DIR))[0]
    assert ours == flw.build_fab_from_disk(APP_DIR)
    assert ".venv" not in " ".join(fi.fab_candidates(APP_DIR))


def test_a_changed_control_api_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.control import ControlHttpClient

    monkeypatch.delattr(ControlHttpClient, "ListRuns")
    with pytest.raises(fi.FlowerInternalsChanged, match="ControlHttpClient has no ListRuns.*1.42"):
        fi.check_control_internals()


@pytest.mark.slow
def test_a_run_started_from_this_process_is_the_run_flwr_ls_shows(tmp_path: Path) -> None:
    """The genofed app with a sites folder that does not exist: the ServerApp fails at once."""
    import json

    from simulations.flower_cli import format_config
    from simulations.simulate import APP_DIR, LocalSuperLink

    with LocalSuperLink(tmp_path / "flower") as link:
        run_id = link.control.start_run(APP_DIR, run_config=format_config({"sites-dir": str(tmp_path / "none"),
                                                                            "run-dir": str(tmp_path / "run")}),
                                        federation_config={"num-supernodes": 2})
        deadline = time.monotonic() + 120
        while not (status := link.control.status(run_id)).startswith("finished") and time.monotonic() < deadline:
            time.sleep(0.2)
        shown = json.loads(link.flwr("ls", "sim", "--run-id", str(run_id), "--format", "json").stdout)["runs"][0]
    assert status == "finished:failed" and shown["status"] == status and int(shown["run-id"]) == run_id


def test_shortened_polls_cap_sleeps_and_keep_flowers_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    saved = {n: dict(getattr(inflatable_utils, n).__kwdefaults__) for n in fi._PULL_FUNCTIONS}
    try:
        stock = saved["pull_objects"]
        fi.shorten_polls(0.05, supernode=True)
        capped = start_client_internal.time
        t0 = time.monotonic()
        capped.sleep(3)
        assert time.monotonic() - t0 < 1.0
        assert capped.monotonic is time.monotonic  # everything else is the real module's
        new = inflatable_utils.pull_objects.__kwdefaults__
        assert new["initial_backoff"] == 0.05 and new["backoff_cap"] == pytest.approx(0.1)
        assert new["max_tries_per_object"] * new["backoff_cap"] >= stock["max_tries_per_object"] * stock["backoff_cap"]
    finally:
        for name, defaults in saved.items():
            getattr(inflatable_utils, name).__kwdefaults__.update(defaults)


class _SlowGrid:
    """Replies become available 0.3 s after the push."""

    def __init__(self) -> None:
        self.pushed: dict[str, float] = {}

    def push_messages(self, messages):
        ids = []
        for i, _ in enumerate(messages):
            self.pushed[f"m{i}"] = time.monotonic()
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            if time.monotonic() - self.pushed[mid] > 0.3:
                msg = Message(RecordDict({"c": ConfigRecord({"ok": 1})}), dst_node_id=1, message_type="query")
                msg.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(msg)
        return out


def test_polling_grid_returns_when_the_replies_land_not_seconds_later() -> None:
    import tests.local_grid  # noqa: F401 - sets the TaskIdentity a bare Message needs

    grid = PollingGrid(_SlowGrid())  # type: ignore[arg-type]
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([object(), object()], timeout=10))  # type: ignore[list-item]
    assert len(replies) == 2
    assert time.monotonic() - t0 < 0.3 + 5 * POLL_S  # Flower's own send_and_receive sleeps 3 s


def _supernode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simulations.cli", "supernode", *args], capture_output=True,
                          text=True, timeout=60)


def test_supernode_refuses_a_vault_that_does_not_open(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "key")
    Vault.create(tmp_path / "vault", KeySource.from_key_file(key), {})
    wrong = generate_key_file(tmp_path / "other-key")
    superlink = ["--superlink", "127.0.0.1:1", "--insecure"]

    out = _supernode(*superlink, "--node-config", f'vault="{tmp_path / "vault"}" key-file="{wrong}"')
    assert out.returncode != 0
    assert out.stderr.startswith("genofed: error:") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path / "vault") in out.stderr

    out = _supernode(*superlink, "--node-config", 'site="x"')
    assert out.returncode != 0 and "names no vault" in out.stderr and "Traceback" not in out.stderr

    out = _supernode(*superlink, "--node-config", f'vault="{tmp_path / "missing"}" key-file="{key}"')
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_only_supernode_passes_unknown_options_on() -> None:
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "keygen", "--out", "/nonexistent/k", "--superlink", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --superlink x" in out.stderr


def test_a_task_whose_input_and_status_both_fail_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """No input, and the status push raises (Flower's push_task_output catches only httpx's errors).
    run_task must not raise, or the warm worker dies and the next task's token, already in its pipe,
    is lost (the site then misses a round of a run that is running)."""
    import types

    flw = fi.check_flower_internals()
    closed, beats = [], []

    class Client:
        def close(self) -> None:
            closed.append(True)

    class Heartbeat:
        is_running = False

        def __init__(self, fn) -> None:
            pass

        def start(self) -> None:
            self.is_running = True
            beats.append("start")

        def stop(self) -> None:
            self.is_running = False
            beats.append("stop")

    def refuse(*args, **kwargs):
        raise RuntimeError("Run 7 is not in RUNNING status")

    rc = types.SimpleNamespace(pull_task_input=refuse, push_message=refuse, push_task_output=refuse)
    stand_in = types.SimpleNamespace(**{**vars(flw), "run_clientapp": rc, "HeartbeatSender": Heartbeat,
                                        "make_task_heartbeat_fn_http": lambda client: None})
    link = types.SimpleNamespace(client=lambda flw, token=None: Client())
    with caplog.at_level("INFO", logger="genofed.flower"):
        fi.run_task(stand_in, link, "token", {})  # returns: nothing escapes
    assert beats == ["start", "stop"] and closed == [True]
    assert "could not push the task's status" in caplog.text and "task ?: " in caplog.text
