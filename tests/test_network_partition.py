"""A real network: the coordinator and three hospitals as separate hosts in network namespaces.

The test builds a small switched network out of Linux network namespaces: one namespace per
host (``coord``, ``site-1``..``site-3``, each with ``eth0`` and loopback) and one for the switch,
a bridge whose ports are the other ends of the hosts' veth pairs, addresses in 10.77.0.0/24.
Nothing is created in the test's own namespace, so parallel runs never collide (every name has
the test's pid and a random suffix; namespaces of a run whose process is gone are deleted). The
SuperLink runs in ``coord`` (TLS, its certificate naming 10.77.0.1, SuperNode authentication),
each hospital's ``genofed supernode`` in its own namespace, the ``flwr`` CLI on the
coordinator; the harness (simulations/deployment.py) starts them through ``ip netns exec``.

Every hospital's link is impaired in both directions for the whole run: ``tc netem`` delay and
loss where the kernel has sch_netem, else (:func:`impair`) the same loss from a BPF random drop
and a bandwidth cap. During CNN round 2 one hospital's switch port goes down, then up again:

- for 5 s, within the round's slack: the hospital's reply lands, it stays in every round;
- for longer than the round timeout: the run completes without it and names it in
  ``metrics.json`` ``missing_sites`` with the first round it missed (2, or 3 when its round 2
  reply was out before the cut) and the reason (or, had it caught up after the cut, it stays).

Either way every CNN round is aggregated exactly once (``rounds`` and ``events.jsonl``).
Everything skips, with the failing command's stderr, where namespaces are not permitted (not
root, no ``ip``, ``ip netns add`` refused) or no loss can be emulated (no ``tc``, or neither
netem nor the fallback's qdiscs). Namespaces (their veths go with them) and processes are
removed by fixture finalizers, also when a test fails. ``make test-attacks`` runs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simulations.deployment import LocalDeployment
from simulations.process_tree import pids_with_environ
from simulations.site_layout import set_layout_policy, split_cohort
from simulations.synthetic import write_synthetic_cohort

APP_DIR = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.attack, pytest.mark.slow, pytest.mark.timeout(420)]

SUBNET = "10.77.0"
COORDINATOR_IP = f"{SUBNET}.1"
HOSPITALS = {"site-1": f"{SUBNET}.11", "site-2": f"{SUBNET}.12", "site-3": f"{SUBNET}.13"}
LOSS = 0.02
NETEM = ("delay", "40ms", "10ms", "loss", f"{LOSS:.0%}")
"""Per direction on each hospital's link: a WAN-like 80 ms round trip (+-20 ms) and 2% loss each way."""
FALLBACK_RATE = "8mbit"
"""Each direction's bandwidth where the kernel has no netem (see :func:`impair`)."""
ROUND_TIMEOUT = 20.0
"""Short, so that a partitioned hospital is given up on well within a minute; the healthy
exchanges of this small run take a few seconds each on 2 loaded cores."""
LONG_CUT = ROUND_TIMEOUT + 8.0
"""Longer than the round timeout: the coordinator gives up on the hospital while it is cut off."""
SHORT_CUT = 5.0
REJOIN_TIMEOUT = 60.0
"""Covers a short cut: a request cut off mid-flight recovers by TCP retransmission once the link
is back (backed off, so up to about twice the cut) or, after Flower's 30 s HTTP timeout, by a
retry; then the handler and the transfers."""
PARTITIONED = "site-3"
# Small and fast: the test is about the transport. No DP (DP-SGD is slower and no privacy question
# is asked here), no site-alone models and no explanations (the longest local work).
RUN = {"cnn-rounds": 3, "local-epochs": 1, "dp": False, "forest-trees": 10, "glm-rounds": 1, "meta-rounds": 1,
       "site-alone": False, "explain": False, "round-timeout": ROUND_TIMEOUT, "wait-timeout": 60.0, "min-sites": 2}
STALE = re.compile(r"^gf(\d+)-[0-9a-f]{6}-")
"""Names of this test's namespaces: ``gf<pid>-<random>-<host>``."""
FLWR_QUIET = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


# ---------------------------------------------------------------------------------------------
# The network


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; with ``check``, a failure raises with the command and its stderr."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


def delete_stale_namespaces() -> list[str]:
    """Delete namespaces left by a run of this test whose process is gone (killed before its finalizers)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    stale = [name for name in listed if (m := STALE.match(name)) and not Path(f"/proc/{m.group(1)}").exists()]
    for name in stale:
        _ip("netns", "del", name, check=False)
    return stale


def _skip_unless_namespaces() -> None:
    """Skip the module, naming why, where this process may not create network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); not root here")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed")
    probe = f"gf-probe-{secrets.token_hex(4)}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {out.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class NamespaceNetwork:
    """One switch namespace with a bridge, and one namespace per host plugged into it by a veth pair.

    Host ``h`` is namespace ``{prefix}-{h}`` with ``eth0`` at its address; its switch port is
    ``{h}`` in ``{prefix}-sw``. :meth:`close` deletes every namespace, which deletes the veths.
    """

    hosts: dict[str, str]
    """Host name -> IPv4 address in SUBNET/24."""
    prefix: str = field(default_factory=lambda: f"gf{os.getpid()}-{secrets.token_hex(3)}")
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        return f"{self.prefix}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        """The command prefix that runs a process on ``host``."""
        return ["ip", "netns", "exec", self.ns(host)]

    def build(self) -> None:
        """Create the switch (a bridge) and every host: its namespace, veth pair to the switch, address, links up."""
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            self._add_host(host, address)

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)  # before anything else can fail: close() must find it
        _ip("-n", name, "link", "set", "lo", "up")  # each host's Runtime API and SuperExec use loopback

    def _add_host(self, host: str, address: str) -> None:
        ns = self.ns(host)
        self._add_ns(ns)
        # created inside the switch namespace, the far end moved straight into the host's: the
        # test's own namespace never holds either end, so no name can collide there
        _ip("-n", self.switch, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", host, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")

    def set_port(self, host: str, up: bool) -> None:
        """Switch port of ``host`` up or down: down cuts the cable at the switch (no RST, no ICMP)."""
        _ip("-n", self.switch, "link", "set", host, "up" if up else "down")

    def tc(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``tc ARGS`` with ``DEV`` standing for each end of ``host``'s link in turn; stops at the first failure."""
        for ns, dev in ((self.ns(host), "eth0"), (self.switch, host)):
            argv = ["tc", "-n", ns, *[dev if a == "DEV" else a for a in args]]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            if out.returncode != 0:
                break
        return out

    def clear(self, host: str) -> None:
        """Remove every impairment from ``host``'s link (nothing there is fine)."""
        self.tc(host, "qdisc", "del", "dev", "DEV", "root")
        self.tc(host, "qdisc", "del", "dev", "DEV", "clsact")

    def tcp_retransmits(self, host: str) -> int:
        """TCP segments ``host`` has retransmitted since its namespace was made (its own /proc/net/snmp)."""
        out = subprocess.run([*self.exec_prefix(host), "cat", "/proc/net/snmp"], capture_output=True, text=True,
                             timeout=30, check=True, stdin=subprocess.DEVNULL)
        names, values = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("Tcp:")]
        return int(dict(zip(names, values))["RetransSegs"])

    def close(self) -> list[str]:
        """Delete every namespace this network created; returns those still listed afterwards."""
        for name in reversed(self.created):
            _ip("netns", "del", name, check=False)
        listed = _ip("netns", "list", check=False).stdout
        return [name for name in self.created if name in listed.split()]


def _random_drop(loss: float) -> str:
    """Classic BPF for ``tc ... bpf da bytecode``: drop (TC_ACT_SHOT) a packet with probability ``loss``.

    ``ld rand`` (the kernel's per-packet random number, SKF_AD_RANDOM) then ``jgt`` against the
    threshold: above it, pass (TC_ACT_OK); otherwise drop.
    """
    threshold = int(loss * 2**32)
    return f"4,32 0 0 {2**32 - 0x1000 + 56},37 1 0 {threshold},6 0 0 2,6 0 0 0"


def impair(net: NamespaceNetwork, hosts: Sequence[str]) -> str:
    """Delay and loss on every host's link, in both directions; returns what was applied.

    With sch_netem: ``netem`` (:data:`NETEM`). Kernels built without it (this project's test
    machines) still get the loss, from a BPF random drop on each end's egress (clsact), and a
    bandwidth cap (``tbf``, :data:`FALLBACK_RATE`) whose queueing delays every larger message;
    neither adds a fixed delay. Skips, with tc's own error, when neither can be set up.
    """
    if shutil.which("tc") is None:
        pytest.skip("`tc` (iproute2) is not installed: no latency or loss can be emulated")
    netem = net.tc(hosts[0], "qdisc", "replace", "dev", "DEV", "root", "netem", *NETEM)
    steps = [("qdisc", "replace", "dev", "DEV", "root", "netem", *NETEM)] if netem.returncode == 0 else [
        ("qdisc", "replace", "dev", "DEV", "root", "tbf", "rate", FALLBACK_RATE, "burst", "32kbit", "latency", "500ms"),
        ("qdisc", "replace", "dev", "DEV", "clsact"),
        ("filter", "replace", "dev", "DEV", "egress", "pref", "1", "bpf", "da", "bytecode", _random_drop(LOSS))]
    for host in hosts:
        for step in steps:
            out = net.tc(host, *step)
            if out.returncode != 0:
                pytest.skip(f"`{' '.join(out.args)}` failed: {out.stderr.strip()}; and sch_netem: "
                            f"{netem.stderr.strip()}")
    return f"netem {' '.join(NETEM)}" if netem.returncode == 0 else \
        f"no sch_netem ({netem.stderr.strip()}): {LOSS:.0%} random drop (BPF) and tbf {FALLBACK_RATE}"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def network() -> Iterator[NamespaceNetwork]:
    _skip_unless_namespaces()
    delete_stale_namespaces()
    net = NamespaceNetwork(hosts={"coord": COORDINATOR_IP, **HOSPITALS})
    try:
        net.build()
        yield net
    finally:
        left = net.close()
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture(scope="module")
def federation(network: NamespaceNetwork, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[tuple[LocalDeployment, Path]]:
    root = tmp_path_factory.mktemp("netns")
    write_synthetic_cohort(out=root / "cohort", patients=240, seed=11)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    set_layout_policy(root / "sites", require_dp=False)  # each site's officer allows this non-private test run
    nodes = {p.name: {"vault": str(p / "vault"), "key-file": str(p / "key"), "site": p.name}
             for p in sorted((root / "sites").iterdir()) if (p / "vault").is_dir()}
    host_of = {"superlink": "coord", "cli": "coord", **{site: site for site in HOSPITALS}}
    dep = LocalDeployment(root / "work", sites=3, host=COORDINATOR_IP, env=FLWR_QUIET,
                          prefix_for=lambda role: network.exec_prefix(host_of[role]))
    with dep:
        dep.start(nodes, timeout=120.0)
        yield dep, root
    assert pids_with_environ(str(dep.workdir).encode()) == [], "processes outlived the deployment"


# ---------------------------------------------------------------------------------------------
# Checks on a finished run


def cnn_rounds_once(run_dir: Path, rounds: int) -> None:
    """Every CNN round was aggregated once: in metrics.json ``rounds`` and in events.jsonl."""
    doc = json.loads((run_dir / "metrics.json").read_text())
    recorded = [r["round"] for r in doc["rounds"] if r.get("phase") == "cnn"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    logged = [e["round"] for e in events if e["event"] == "cnn-round"]
    assert recorded == list(range(1, rounds + 1)), f"CNN rounds in metrics.json: {recorded}"
    assert logged == list(range(1, rounds + 1)), f"CNN rounds in events.jsonl: {logged}"


def wait_for_event(run_dir: Path, kind: str, timeout: float, **match: Any) -> float:
    """Wait until events.jsonl holds an event ``kind`` with the ``match`` fields; returns its time."""
    deadline = time.monotonic() + timeout
    path = run_dir / "events.jsonl"
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines() if path.exists() else []:
            event = json.loads(line)
            if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                return float(event["time"])
        time.sleep(0.2)
    raise AssertionError(f"no {kind} event {match} in {path} after {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------
# Tests


@dataclass
class PartitionedRun:
    """A finished run whose hospital :data:`PARTITIONED` was cut off during CNN round 2."""

    run_dir: Path
    doc: dict[str, Any]
    impairment: str
    cut_s: float
    seconds: float
    retransmits: dict[str, int]


def run_with_partition(dep: LocalDeployment, net: NamespaceNetwork, run_dir: Path, *, round_timeout: float,
                       partition_s: float) -> PartitionedRun:
    """Submit a run over impaired links, cut :data:`PARTITIONED` off mid CNN round 2, heal, wait for the end.

    The links are impaired from before submission to the end of the run (:func:`impair`), and
    cleared again whatever happens, as is the partition.
    """
    started = time.monotonic()
    try:
        applied = impair(net, list(HOSPITALS))
        run_id = dep.submit_run(APP_DIR, run_config={**RUN, "round-timeout": round_timeout, "run-dir": str(run_dir)})
        wait_for_event(run_dir, "cnn-round", timeout=180.0, round=1)
        time.sleep(0.5)  # round 2's message is out and the hospitals are fetching it or training
        net.set_port(PARTITIONED, up=False)
        cut = time.monotonic()
        time.sleep(partition_s)
        net.set_port(PARTITIONED, up=True)
        cut_s = time.monotonic() - cut
        status = dep.wait_run(run_id, timeout=240.0)
        retransmits = {host: net.tcp_retransmits(host) for host in HOSPITALS}
    finally:
        net.set_port(PARTITIONED, up=True)
        for host in HOSPITALS:
            net.clear(host)
    assert status.completed, dep.run_log(run_id)[-3000:]
    doc = json.loads((run_dir / "metrics.json").read_text())
    return PartitionedRun(run_dir=run_dir, doc=doc, impairment=applied, cut_s=cut_s,
                          seconds=time.monotonic() - started, retransmits=retransmits)


def describe(dep: LocalDeployment, run: PartitionedRun) -> str:
    """One line for the test output: what the network did and what the run made of it."""
    node = dep.supernodes[PARTITIONED]
    after = dep.supernode_statuses().get(node.node_id or -1, "unknown") if node.alive() else "exited"
    sites = {r["round"]: sorted(r["sites"]) for r in run.doc["rounds"] if r.get("phase") == "cnn"}
    return (f"{run.impairment}; {PARTITIONED} cut off for {run.cut_s:.1f} s in CNN round 2 (round-timeout "
            f"{run.doc['settings']['round_timeout']:.0f} s); missing {run.doc['missing_sites']}; sites per CNN round "
            f"{sites}; its SuperNode afterwards: {after}; TCP retransmissions {run.retransmits}; "
            f"run {run.seconds:.1f} s; exchanges {[r.get('seconds') for r in run.doc['rounds']]}")


def test_short_partition_over_lossy_links_the_hospital_rejoins(federation, network: NamespaceNetwork) -> None:
    """Cut off for less than the round's slack: every hospital's reply lands and every round has all three."""
    dep, root = federation
    run = run_with_partition(dep, network, root / "run-short", round_timeout=REJOIN_TIMEOUT, partition_s=SHORT_CUT)
    print(f"\n{describe(dep, run)}")
    assert run.doc["missing_sites"] == {} and set(run.doc["sites"]) == set(HOSPITALS), run.doc["missing_sites"]
    cnn_rounds_once(run.run_dir, RUN["cnn-rounds"])
    assert all(sorted(r["sites"]) == sorted(HOSPITALS) for r in run.doc["rounds"] if r.get("phase") == "cnn")
    assert sum(run.retransmits.values()) > 0, "the impaired links lost nothing: the impairment is not in effect"


def test_long_partition_the_hospital_is_named_missing_and_no_round_counts_twice(
        federation, network: NamespaceNetwork) -> None:
    """Cut off for longer than the round timeout: the run goes on without it and names it.

    Its late reply (sent once the link is back) must not be aggregated into any round.
    """
    dep, root = federation
    run = run_with_partition(dep, network, root / "run-long", round_timeout=ROUND_TIMEOUT, partition_s=LONG_CUT)
    print(f"\n{describe(dep, run)}")
    cnn_rounds_once(run.run_dir, RUN["cnn-rounds"])
    missing = run.doc["missing_sites"]
    assert set(missing) <= {PARTITIONED}, f"only the partitioned hospital may be missing: {missing}"
    if PARTITIONED in missing:  # given up on: named with the exchange and the reason
        # The cut starts in round 2 but outlasts it when the hospital's round 2 reply was out first:
        # the round named is the first one it is absent from, and it is absent from every later one.
        with_it = [PARTITIONED in r["sites"] for r in run.doc["rounds"] if r.get("phase") == "cnn"]
        assert not all(with_it), f"named missing but in every CNN round: {missing}"
        first_absent = with_it.index(False) + 1
        assert first_absent >= 2 and not any(with_it[first_absent - 1:]), with_it
        # Either nothing came back in time, or the cut fell inside the reply's upload: the SuperLink
        # then answers with Flower's error for a reply whose objects never arrived (seen once in CI).
        assert re.fullmatch(rf"CNN round {first_absent}: (no reply within {ROUND_TIMEOUT:.0f} s|error code 3: Reply "
                            r"message objects are unavailable\. .*)", missing[PARTITIONED]), missing
        assert set(run.doc["sites"]) == set(HOSPITALS) - {PARTITIONED}
        assert f"site {PARTITIONED} failed and leaves the run" in (run.run_dir / "run.log").read_text()
    else:  # it had replied before the cut
        assert set(run.doc["sites"]) == set(HOSPITALS)
