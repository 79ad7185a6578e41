"""Every use genofed makes of Flower's internal modules, in one place (Flower pinned to 1.42.x).

Flower 1.42's deployment path waits longer than it must, and offers no setting to change it:

- the SuperNode sleeps 3 s between pulls from the SuperLink and 0.5 s between looks for a reply
  (``flwr.supernode.start_client_internal``, ``time.sleep(3)`` and ``time.sleep(0.5)``);
- an object not yet uploaded is pulled again after 1 s, then 2 s, ...
  (``flwr.supercore.inflatable.inflatable_utils``, ``initial_backoff = PULL_INITIAL_BACKOFF``),
  on the SuperNode, in the ClientApp and in the ServerApp;
- every message runs in a fresh ``flwr-clientapp`` process, started by ``flower-superexec``.

:func:`shorten_polls` caps the first two (per process); :func:`run_task` runs one ClientApp task
the way ``flwr-clientapp`` does (``flwr.supernode.runtime.run_clientapp``'s ``pull_task_input``,
``push_message``, ``push_task_output``), so that :mod:`client.warm_node` can run many in one warm
process; :class:`TaskSource` acquires tasks from a SuperNode's Runtime API as
``flower-superexec`` does. :func:`check_flower_internals` checks, at start-up and in
``tests/test_flower_internals.py``, that each piece is what 1.42 had, and fails loudly naming
what changed.

:class:`ControlClient` sends what ``flwr run``, ``flwr ls`` and ``flwr stop`` send to a
SuperLink's Control API (``flwr.cli``'s FAB build and interceptors, the ``control_pb2``
requests), from the calling process: ``genofed simulate`` no longer starts a ``flwr`` process,
a second of imports, for each; :func:`check_control_internals` checks those pieces.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import GenofedError

log = logging.getLogger("genofed.flower")

PRELOAD = ("flwr.app", "flwr.clientapp", "flwr.cli.install", "flwr.clientapp.utils",
           "flwr.supernode.runtime.run_clientapp", "flwr.supercore.heartbeat", "flwr.supercore.runtime")
"""The Flower modules a ClientApp task needs (for a process that preloads them)."""
CONCURRENT_PULLS = 8
"""Objects pulled at once (Flower's default: 2)."""
PULL_BACKOFF_POLLS = 2
"""An object not yet uploaded is pulled again after poll, 2 x poll, ..., at most this many polls."""
_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
_PULL_KEYWORDS = ("initial_backoff", "backoff_cap", "max_tries_per_object", "max_concurrent_pulls")
_ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


class FlowerInternalsChanged(GenofedError):
    """An internal Flower module genofed relies on is not what Flower 1.42 had."""


def _internals() -> types.SimpleNamespace:
    """Every internal Flower object used here, imported by name (raises if one is gone)."""
    from flwr.app.error import Error
    from flwr.app.message import Message
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                             SuperExecAuthHttpInterceptor)
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp

    return types.SimpleNamespace(**{k: v for k, v in locals().items()})


def _supernode_internals() -> types.SimpleNamespace:
    """The SuperNode process's own modules (imported only where a SuperNode runs: they are heavy)."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    return types.SimpleNamespace(start_client_internal=start_client_internal, flower_supernode=flower_supernode)


def _pull_problems(inflatable_utils: types.ModuleType) -> list[str]:
    """What is missing of the object-pull keywords :func:`shorten_polls` changes."""
    problems = []
    for name in _PULL_FUNCTIONS:
        fn = getattr(inflatable_utils, name, None)
        missing = set(_PULL_KEYWORDS) - set(getattr(fn, "__kwdefaults__", None) or {})
        if missing:
            problems.append(f"flwr.supercore.inflatable.inflatable_utils.{name} has no keyword {sorted(missing)}")
    return problems


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise FlowerInternalsChanged("Flower's internal modules changed: " + "; ".join(problems)
                                     + ". genofed needs flwr 1.42.x (or run plain flower-supernode)")


def check_flower_internals(*, supernode: bool = False) -> types.SimpleNamespace:
    """The internals, after checking each is what genofed was written against (Flower 1.42).

    Raises
    ------
    FlowerInternalsChanged
        Naming what is missing or different. The fix is to pin Flower back to 1.42.x, or to
        revise this module against the new release.
    """
    try:
        flw = _internals()
        if supernode:
            flw.__dict__.update(vars(_supernode_internals()))
    except (ImportError, AttributeError) as exc:
        raise FlowerInternalsChanged(f"Flower's internal modules changed ({exc}); genofed needs flwr 1.42.x "
                                     "(reinstall it, or run plain flower-supernode)") from None
    problems = []
    if supernode and not isinstance(getattr(flw.start_client_internal, "time", None), types.ModuleType):
        problems.append("flwr.supernode.start_client_internal no longer imports `time` (its poll sleeps)")
    problems += _pull_problems(flw.inflatable_utils)
    for name in ("pull_task_input", "push_message", "push_task_output"):
        if not callable(getattr(flw.run_clientapp, name, None)):
            problems.append(f"flwr.supernode.runtime.run_clientapp.{name} is gone")
    if "CLIENT_APP" not in getattr(flw.TaskType, "__members__", {}):
        problems.append("flwr.supercore.constant.TaskType has no CLIENT_APP")
    if "supported_task_types" not in {f.name for f in flw.AcquireTaskRequest.DESCRIPTOR.fields}:
        problems.append("flwr.proto.runtime_pb2.AcquireTaskRequest has no supported_task_types")
    _raise_if(problems)
    return flw


# ---------------------------------------------------------------------------------------------
# Shorter waits


class _CappedTime(types.ModuleType):
    """``time`` as a Flower module sees it, whose ``sleep`` never waits longer than ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        # everything but sleep: an instance attribute would hide the method below
        self.__dict__.update({k: v for k, v in vars(time).items() if k != "sleep" and not k.startswith("__")})
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, at most ``cap`` seconds."""
        time.sleep(min(seconds, self.cap))


def shorten_polls(poll_s: float, *, supernode: bool = False) -> None:
    """Cap Flower's object-pull backoff (and, with ``supernode``, its poll sleeps) at ``poll_s``.

    Applies to this process only, and checks only the pieces it changes (a ServerApp does not
    import the SuperNode's modules for it).
    """
    from flwr.supercore.inflatable import inflatable_utils

    _raise_if(_pull_problems(inflatable_utils))
    if supernode:
        check_flower_internals(supernode=True).start_client_internal.time = _CappedTime(poll_s)
    for name in _PULL_FUNCTIONS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__
        cap = min(defaults["backoff_cap"], PULL_BACKOFF_POLLS * poll_s)
        # as patient as Flower's own (tries x cap), at a shorter step
        defaults["max_tries_per_object"] = int(defaults["max_tries_per_object"] * defaults["backoff_cap"] / cap)
        defaults["initial_backoff"] = min(defaults["initial_backoff"], poll_s)
        defaults["backoff_cap"] = cap
        defaults["max_concurrent_pulls"] = max(defaults["max_concurrent_pulls"], CONCURRENT_PULLS)


def quiet_logs() -> None:
    """Flower logs through its own handler: keep its records, and httpx's per-request lines, off ours."""
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_supernode(flower_args: Sequence[str], *, poll_s: float) -> None:
    """Run ``flower-supernode FLOWER_ARGS`` in this process, with its polls capped at ``poll_s``."""
    shorten_polls(poll_s, supernode=True)
    quiet_logs()
    sys.argv = ["flower-supernode", *flower_args]
    check_flower_internals(supernode=True).flower_supernode()


# ---------------------------------------------------------------------------------------------
# Tasks from a SuperNode's Runtime API


@dataclass(frozen=True)
class RuntimeLink:
    """How a worker reaches its SuperNode's Runtime API (picklable: it is sent to run workers)."""

    address: str
    root_certificates: bytes | None = None
    superexec_auth_secret: bytes | None = None

    def client(self, flw: types.SimpleNamespace, *, token: str | None = None) -> Any:
        """A Runtime API client: with ``token`` one that acts for that task, else one that acquires tasks."""
        component = "flwr-clientapp" if token is not None else "SuperExec"
        interceptors: list[Any] = [flw.RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(flw.RuntimeTokenHttpInterceptor(token))
        elif self.superexec_auth_secret:
            interceptors.append(flw.SuperExecAuthHttpInterceptor(master_secret=self.superexec_auth_secret,
                                                                 protected_methods={_ACQUIRE_TASK}))
        return flw.RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.root_certificates is None,
            root_certificates=self.root_certificates, interceptors=interceptors,
            retry_invoker=flw.make_simple_http_retry_invoker())


def load_superexec_auth_secret(path: str) -> bytes | None:
    """The SuperExec secret in ``path``, read as Flower reads it."""
    return check_flower_internals().load_superexec_auth_secret(path)


@dataclass(frozen=True)
class Task:
    """One acquired ClientApp task: its run, its FAB and the token that lets a process serve it."""

    run_id: int
    fab_hash: str
    token: str


class TaskSource:
    """Acquires ClientApp tasks from one SuperNode, as ``flower-superexec`` does."""

    def __init__(self, link: RuntimeLink) -> None:
        self._flw = check_flower_internals()
        self._client = link.client(self._flw)
        self._request = self._flw.AcquireTaskRequest(supported_task_types=[self._flw.TaskType.CLIENT_APP])

    def acquire(self) -> Task | None:
        """The next task, or ``None`` if there is none now."""
        res = self._client.AcquireTask(self._request)
        if res.HasField("task") and res.token:
            return Task(run_id=res.task.run_id, fab_hash=res.task.fab_hash, token=res.token)
        return None

    def close(self) -> None:
        """Release the HTTP connection."""
        self._client.close()


def run_task(flw: types.SimpleNamespace, link: RuntimeLink, token: str, apps: dict[str, Any]) -> None:
    """One ClientApp task, run in this process the way ``flwr-clientapp`` runs it.

    ``apps`` caches the loaded ClientApp per FAB hash (install once, import once). The reply, or
    an error reply naming the exception as ``flwr-clientapp`` words it, and then the task's final
    status and context go back to the SuperNode; nothing a handler raises escapes, and a failure to
    push the reply or the status is logged, not raised. ``flw`` is
    :func:`check_flower_internals`' result, checked once per worker rather than per task.
    """
    rc = flw.run_clientapp
    client = link.client(flw, token=token)
    heartbeat = flw.HeartbeatSender(flw.make_task_heartbeat_fn_http(client))
    message = context = reply = None
    started, handler_s = time.monotonic(), 0.0
    status, details = flw.SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = rc.pull_task_input(client)
        app = apps.get(fab.hash_str)
        if app is None:
            flw.install_from_fab(fab.content, skip_prompt=True)
            load = flw.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        t0 = time.monotonic()
        reply = app(message=message, context=context)
        handler_s = time.monotonic() - t0
        status, details = flw.SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply, as in flwr-clientapp
        details = f"{type(exc)}:<'{exc}'>"
        code = flw.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        if isinstance(exc, flw.LoadClientAppError):
            details, code = "An exception was raised when attempting to load `ClientApp`", \
                flw.ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        log.exception("ClientApp raised an exception")
        if message is not None:
            reply = flw.Message(flw.Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                rc.push_message(client, reply, context)
        except Exception:  # noqa: BLE001 - the task's status still goes back
            log.exception("could not push the reply message")
        try:
            rc.push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception:  # noqa: BLE001 - Flower catches only httpx's errors here; the worker must live on
            log.exception("could not push the task's status")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    kind = message.metadata.message_type if message is not None else "?"
    log.info("task %s: %s in %.2f s (handler %.2f s)", kind, status, time.monotonic() - started, handler_s)


# ---------------------------------------------------------------------------------------------
# The Control API from this process


def _control_internals() -> types.SimpleNamespace:
    """What ``flwr run``, ``flwr ls`` and ``flwr stop`` use to reach the Control API (raises if one is gone)."""
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.common.config import parse_config_args
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest, StopRunRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.utils import simulation_config_from_json

    return types.SimpleNamespace(**{k: v for k, v in locals().items()})


def check_control_internals() -> types.SimpleNamespace:
    """The Control API pieces, after checking each is what Flower 1.42's CLI used."""
    try:
        flw = _control_internals()
    except (ImportError, AttributeError) as exc:
        raise FlowerInternalsChanged(f"Flower's CLI modules changed ({exc}); genofed needs flwr 1.42.x") from None
    problems = [f"flwr.supercore.control.ControlHttpClient has no {name}" for name in ("StartRun", "ListRuns", "StopRun")
                if not callable(getattr(flw.ControlHttpClient, name, None))]
    fields = {f.name for f in flw.StartRunRequest.DESCRIPTOR.fields}
    problems += [f"flwr.proto.control_pb2.StartRunRequest has no {name}" for name in
                 ("fab", "override_config", "federation", "override_federation_config") if name not in fields]
    _raise_if(problems)
    return flw


def fab_candidates(app_dir: Path) -> dict[str, Path]:
    """The files of ``app_dir`` its ``fab-include`` patterns name, for Flower's own FAB filters.

    ``flwr run`` hands Flower's FAB builder every file under the app folder, which here includes
    ``.venv`` (tens of thousands of files: 3.4 s of a 4.5 s submission); the builder keeps only
    what ``fab-include`` names (and ``.gitignore`` and its built-in rules allow), so globbing those
    patterns first builds the same FAB, byte for byte (``tests/test_flower_internals.py``).
    Without ``fab-include``, every file, as Flower would.
    """
    import tomllib

    config = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    names = ["pyproject.toml", ".gitignore"]
    paths = [app_dir / n for n in names] + [p for pattern in patterns or ["**/*"] for p in app_dir.glob(pattern)]
    root = app_dir.resolve()
    return {p.relative_to(app_dir).as_posix(): p for p in paths
            if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(root)}


class ControlClient:
    """A SuperLink's Control API called from this process, as Flower 1.42's ``flwr run``, ``ls`` and ``stop`` call it.

    Each ``flwr`` command is a Python process that spends about a second importing before it
    sends its one request (docs/federation.md, "Measured"); ``genofed simulate`` sends several
    per run. Insecure connections only: a private simulation SuperLink on loopback.
    """

    def __init__(self, address: str) -> None:
        self._flw = flw = check_control_internals()
        self._client = flw.ControlHttpClient.from_server_address(
            address, insecure=True, root_certificates=None,
            interceptors=[flw.CliClientHttpInterceptor(), flw.RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def start_run(self, app_dir: Path, *, run_config: str, federation_config: Mapping[str, Any]) -> int:
        """Build ``app_dir``'s FAB and start a run, as ``flwr run APP --run-config .. --federation-config ..``."""
        import hashlib

        flw = self._flw
        fab_bytes = flw.build_fab_from_files(fab_candidates(app_dir))[0]
        fab = flw.Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        simulation = flw.simulation_config_from_json({k.replace("-", "_"): v for k, v in federation_config.items()})
        request = flw.StartRunRequest(
            fab=flw.fab_to_proto(fab), override_config=flw.user_config_to_proto(flw.parse_config_args([run_config])),
            federation="", override_federation_config=simulation, app_spec="")
        response = self._client.StartRun(request)
        if not response.HasField("run_id"):
            raise GenofedError("the SuperLink did not start the run" + (f": {response.note}"
                                                                        if response.HasField("note") else ""))
        return int(response.run_id)

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` prints it (``running``, ``finished:completed``, ...)."""
        runs = self._client.ListRuns(self._flw.ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise ValueError(f"the SuperLink has no run {run_id}")
        status = runs[run_id].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else status.status

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop the run, as ``flwr stop``."""
        self._client.StopRun(self._flw.StopRunRequest(run_id=run_id))

    def close(self) -> None:
        """Release the HTTP connection."""
        self._client.close()


# ---------------------------------------------------------------------------------------------
# Secure aggregation's building blocks (common/secure_sum.py)


def _secagg_internals() -> types.SimpleNamespace:
    """The SecAgg+ building blocks genofed's secure sum reuses (raises if one is gone).

    Shamir's secret sharing (over pycryptodome), ECDH key agreement with HKDF, Fernet encryption
    and the SECP384R1 key pairs. Not reused: ``secaggplus_utils.pseudo_rand_gen``, which folds its
    seed to 32 bits (a mask an observer could search), and ``quantization``, which clips and rounds
    stochastically into int32; common/secure_sum.py says what it uses instead.
    """
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    return types.SimpleNamespace(**{k: v for k, v in locals().items()})


_SECAGG_SIGNATURES = {
    "create_shares": ("secret", "threshold", "num"), "combine_shares": ("share_list",),
    "generate_shared_key": ("private_key", "public_key"), "encrypt": ("key", "plaintext"),
    "decrypt": ("key", "ciphertext"), "generate_key_pairs": (), "private_key_to_bytes": ("private_key",),
    "bytes_to_private_key": ("private_key_bytes",), "public_key_to_bytes": ("public_key",),
    "bytes_to_public_key": ("public_key_bytes",)}


def check_secagg_internals() -> types.SimpleNamespace:
    """The secure-sum building blocks, after checking their signatures are Flower 1.42's.

    Raises
    ------
    FlowerInternalsChanged
        A building block is gone or takes other arguments.
    """
    import inspect

    try:
        flw = _secagg_internals()
    except (ImportError, AttributeError) as exc:
        raise FlowerInternalsChanged(f"Flower's secure aggregation modules changed ({exc}); genofed needs "
                                     "flwr 1.42.x") from None
    problems = []
    for name, params in _SECAGG_SIGNATURES.items():
        got = tuple(inspect.signature(getattr(flw, name)).parameters)
        if got != params:
            problems.append(f"{name} takes {got}, 1.42 took {params}")
    _raise_if(problems)
    return flw
