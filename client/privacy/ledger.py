"""The site's privacy ledger: every release composed into one (epsilon, delta), never reset.

Every result that leaves a site and was computed from its patients (a DP-SGD trained CNN update,
noised meta-classifier statistics, noised explanation summaries, anything a later phase adds) is
a *release*. Each release is a (subsampled) Gaussian mechanism, described by its noise multiplier
(noise std / L2 sensitivity), sample rate and number of steps. The ledger records them all and
composes them into the site's spend with Renyi DP; the site refuses any release that would take
the spend above its budget.

Where it lives
--------------
Inside the site's vault, as the role ``privacy/ledger`` (JSON, below). The vault encrypts and
authenticates it, so it cannot be read without the key nor edited or truncated without
detection, and every write is one atomic, fsync-ed :meth:`client.vault.Vault.update`: a killed
process leaves the previous ledger or the new one. Re-importing the cohort
(``genofed vault import --force``) only replaces ``cohort/*`` roles, so it never resets the
ledger; neither does a new run of the same site. What the folder alone cannot detect (see the
vault's docstring): the whole vault rolled back to an older copy, or deleted and re-created.

Order of operations
-------------------
The caller charges a release *before* it leaves the site, and sends it only if :meth:`charge`
returned: a crash between charging and sending over-counts (the site paid for a release nobody
received), never under-counts. A charge that would exceed the budget raises
:class:`PrivacyBudgetExceeded` before anything is written; the release must then not be sent, and
the site says so in its reply. To avoid training for nothing, check :meth:`would_spend` with the
planned releases first.

Accounting
----------
All releases are composed with Renyi DP exactly as Opacus' ``RDPAccountant`` does (per-step RDP
of the subsampled Gaussian from ``opacus.accountants.analysis.rdp``, summed, converted to
(epsilon, delta) at the ledger's delta): the spend equals
``RDPAccountant.get_epsilon(delta, alphas=ORDERS)`` over the list of releases. :data:`ORDERS` are
Opacus' default orders plus higher ones up to 1024, so that small per-release budgets (below
about 0.1) can be calibrated and charged; extra orders only tighten the bound, so the spend is
never more than Opacus reports with its default orders. RDP is linear in
the number of steps, so releases with the same (noise multiplier, sample rate) are summed first
and each pair's RDP is computed once: the result is Opacus' up to floating-point rounding, and a
long ledger stays cheap. A training run accounted with Opacus' ``prv`` or ``gdp`` accountant is
still composed here with RDP: every valid accountant bounds the same mechanisms, RDP may report a
larger epsilon than PRV (safe), and one accountant is needed to compose different mechanisms.
The unit protected is one record of the site's data, as in DP-SGD. Not covered: the random
number generator is not cryptographically secure (Opacus' secure mode needs torchcsprng,
unavailable here); a non-DP run (``--no-dp``, only where the site policy allows it) releases
without noise and is not charged here.

Concurrent writers
------------------
:meth:`charge` and :meth:`set_budget` re-read the ledger and write it back while holding an
exclusive ``flock`` on the folder that holds the vault (the vault's own lock is on the vault
folder and is taken inside :meth:`Vault.update`, so the two never wait on each other), so two
processes charging the same site never lose a charge, and the budget check always sees every
earlier charge. Writers of other roles (cohort, models) go through ``Vault.update``, which keeps
roles it is not given, so they cannot drop the ledger either.

Format (``privacy/ledger``, version 1)::

    {"format": "genofed-privacy-ledger", "version": 1, "site": "<name at creation>",
     "created_at": "<UTC ISO 8601>", "accountant": "rdp", "revision": <writes so far>,
     "budget": {"epsilon": <float>, "delta": <float>},
     "budget_history": [{"at", "epsilon", "delta", "change": "created" | "lowered" | "raised"}],
     "charges": [{"seq": 1, "at", "run_id", "round": <int or null>,
                  "releases": [{"kind", "label", "noise_multiplier", "sample_rate", "steps"}]}]}

No patient data is stored: only run ids, labels, timestamps and mechanism parameters.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from client.vault import Vault
from common.durable import directory_lock
from common.errors import GenofedError

LEDGER_ROLE = "privacy/ledger"
FORMAT = "genofed-privacy-ledger"
VERSION = 1
KINDS = ("dp-sgd", "gaussian")
DEFAULT_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
LOCK_WAIT_S = 30.0
# Opacus' RDPAccountant.DEFAULT_ALPHAS (restated so that composing needs no torch import; a
# test asserts they agree), extended up to order 1024 (above it Opacus' binomial overflows).
# With Opacus' orders alone (up to 63) no release can cost less than about epsilon 0.1 at delta
# 1e-5; more orders only tighten the bound, which is the minimum over the orders.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                  + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024])
_MAX_SIGMA = 1e6  # Opacus' get_noise_multiplier gives up at the same noise multiplier
_FIX_BUDGET = ("raise the site's budget with `genofed ledger set-budget --allow-raise` only if the site's "
               "privacy officer agrees")


class LedgerError(GenofedError):
    """The ledger cannot be read, written or changed as asked; the message says why and what to do."""


class PrivacyBudgetExceeded(GenofedError):
    """A charge would take the site's spend above its budget; nothing was recorded or released.

    Attributes ``site``, ``labels``, ``spent``, ``would_reach``, ``budget`` and ``delta`` let a
    ClientApp put the refusal into its reply.
    """

    def __init__(self, *, site: str, labels: Sequence[str], run_id: str, round: int | None, spent: float,
                 would_reach: float, budget: float, delta: float) -> None:
        self.site, self.labels, self.run_id, self.round = site, list(labels), run_id, round
        self.spent, self.would_reach, self.budget, self.delta = spent, would_reach, budget, delta
        self._fields = {"site": site, "labels": list(labels), "run_id": run_id, "round": round, "spent": spent,
                        "would_reach": would_reach, "budget": budget, "delta": delta}
        where = f"run {run_id}" + ("" if round is None else f", round {round}")
        super().__init__(
            f"site {site}: refused to release {', '.join(labels)} ({where}): it would take the site's privacy "
            f"spend from epsilon {spent:.4g} to {would_reach:.4g} (delta {delta:g}), above its budget epsilon "
            f"{budget:.4g}; nothing was released or recorded; {_FIX_BUDGET}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions unpickle as cls(*args), which keyword-only arguments break; Ray and
        # multiprocessing pickle the errors of their workers.
        return (functools.partial(PrivacyBudgetExceeded, **self._fields), ())


# ---------------------------------------------------------------------------------------------
# Releases


@dataclass(frozen=True)
class Release:
    """One mechanism applied to the site's data whose result leaves the site.

    Parameters
    ----------
    kind : ``"dp-sgd"`` (Poisson-subsampled Gaussian steps) or ``"gaussian"`` (Gaussian noise
        added to a statistic of the whole data: ``sample_rate`` 1).
    noise_multiplier : noise standard deviation divided by the L2 sensitivity (clipping norm).
    sample_rate : probability that a record takes part in one step.
    steps : number of such steps (for ``"gaussian"``: number of statistics released, each with
        this noise multiplier).
    label : what was released, e.g. ``"cnn-update"``, ``"meta-statistics"``.
    run_id : the federated run that asked for it.
    round : the round within the run, or None for a one-off release.
    """

    kind: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str
    run_id: str
    round: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"release kind must be one of {KINDS}, got {self.kind!r}")
        sigma, q = self.noise_multiplier, self.sample_rate
        if not _is_real(sigma) or not math.isfinite(sigma) or sigma <= 0:
            # A noiseless release has no finite epsilon: it must not be charged as if private.
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if not _is_real(q) or not 0 < q <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        if self.kind == "gaussian" and q != 1:
            raise ValueError(f"a gaussian release uses the whole data: sample_rate must be 1, got {q!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        for name in ("label", "run_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.round is not None and (isinstance(self.round, bool) or not isinstance(self.round, int)
                                       or self.round < 0):
            raise ValueError(f"round must be None or an int >= 0, got {self.round!r}")
        # Plain Python numbers (numpy's included), so that equal mechanisms compare and group
        # equal and the ledger's JSON holds exactly what was composed.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(self.steps))

    @classmethod
    def gaussian(cls, *, noise_multiplier: float, label: str, run_id: str, round: int | None = None,
                 count: int = 1) -> Release:
        """``count`` Gaussian releases of whole-data statistics, each with ``noise_multiplier``.

        Calibrate ``noise_multiplier`` with :func:`gaussian_noise_multiplier`; add noise of
        standard deviation ``noise_multiplier * sensitivity`` to each statistic.
        """
        return cls(kind="gaussian", noise_multiplier=noise_multiplier, sample_rate=1.0, steps=count,
                   label=label, run_id=run_id, round=round)

    @classmethod
    def from_accountant_state(cls, state: Mapping[str, Any], *, previous: Mapping[str, Any] | None = None,
                              label: str, run_id: str, round: int | None) -> list[Release]:
        """The DP-SGD releases that ``state`` adds to ``previous`` (both as returned by training).

        ``state`` is :attr:`client.dp_training.TrainResult.accountant_state`: its ``history`` lists
        ``[noise_multiplier, sample_rate, steps]``. Opacus merges consecutive steps with the same
        noise and rate into the last entry, so ``state`` extends ``previous`` by growing its last
        entry's steps and/or appending entries; only that difference is returned (one release per
        new or grown entry), so that training resumed from a stored state is not charged twice.
        With ``previous=None`` every entry is new.

        Raises
        ------
        ValueError
            ``state`` does not extend ``previous`` (a different run's state, or a reset accountant).
        """
        new = _history_of(state, what="state")
        old = _history_of(previous, what="previous") if previous is not None else []
        if len(old) > len(new):
            raise ValueError(f"accountant state has {len(new)} history entries, fewer than the previous "
                             f"state's {len(old)}: it does not extend it")
        out = []
        for i, (sigma, q, steps) in enumerate(new):
            done = 0
            if i < len(old):
                o_sigma, o_q, done = old[i]
                if (o_sigma, o_q) != (sigma, q) or steps < done or (steps != done and i != len(old) - 1):
                    raise ValueError(f"accountant history entry {i} {[sigma, q, steps]} does not extend the "
                                     f"previous state's {[o_sigma, o_q, done]}")
            if steps > done:
                out.append(cls(kind="dp-sgd", noise_multiplier=sigma, sample_rate=q, steps=steps - done,
                               label=label, run_id=run_id, round=round))
        return out

    def to_json(self) -> dict[str, Any]:
        """The mechanism part (run and round are stored once per charge)."""
        return {"kind": self.kind, "label": self.label, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps}


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _history_of(state: Mapping[str, Any] | None, *, what: str) -> list[tuple[float, float, int]]:
    try:
        return [(float(s), float(q), int(n)) for s, q, n in state["history"]]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{what} is not an accountant state with a history of "
                         "[noise_multiplier, sample_rate, steps]") from None


def gaussian_noise_multiplier(*, epsilon: float, delta: float, count: int = 1) -> float:
    """The noise multiplier for ``count`` whole-data Gaussian releases costing ``epsilon`` together.

    Calibrated with the ledger's own accounting (Renyi DP over Opacus' orders, bisection to 1e-6
    relative), so that charging the releases alone spends at most ``epsilon`` at ``delta``. RDP
    is not the tightest bound for one Gaussian release (the analytic Gaussian of Balle and Wang
    needs somewhat less noise), but it is the one the ledger composes with; a tighter calibration
    would be charged more than it was calibrated for. Noise std = multiplier * L2 sensitivity
    (see :func:`gaussian_noise_std`).

    Raises
    ------
    ValueError
        ``epsilon`` or ``delta`` out of range, or so small that no noise multiplier up to 1e6
        reaches it.
    """
    _check_budget_numbers(epsilon=epsilon, delta=delta, error=ValueError)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")

    return _calibrate(epsilon=epsilon, delta=delta, sample_rate=1.0, steps=count)


def dpsgd_noise_multiplier(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for ``steps`` subsampled Gaussian steps at ``sample_rate`` costing ``epsilon``.

    The ledger's own calibration (Renyi DP over :data:`ORDERS`): used to *plan* a run's DP-SGD
    spend without importing Opacus. Training calibrates with Opacus' default orders, which need
    at least as much noise, so the spend charged is at most the one planned.
    """
    _check_budget_numbers(epsilon=epsilon, delta=delta, error=ValueError)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    # Each evaluation of a subsampled mechanism's RDP takes most of a second (Opacus' series over
    # the fractional orders): 1e-3 of the noise is precise enough for a plan, and the lower end
    # over-states the plan's spend by at most that, never under-states it.
    return _calibrate(epsilon=epsilon, delta=delta, sample_rate=float(sample_rate), steps=steps, rtol=1e-3,
                      lower=True)


def _calibrate(*, epsilon: float, delta: float, sample_rate: float, steps: int, rtol: float = 1e-6,
               lower: bool = False) -> float:
    """Bisection on the noise multiplier; ``high`` costs at most ``epsilon``, ``low`` at least.

    ``lower`` returns the end that costs slightly *more* than ``epsilon`` (within ``rtol`` of the
    noise): what a plan wants, so that it never under-states what will be charged.
    """
    def cost(sigma: float) -> float:
        return _epsilon_of({(sigma, sample_rate): steps}, delta=delta, cache=False)

    low, high = 0.0, 1.0
    while cost(high) > epsilon:
        low, high = high, high * 2
        if high > _MAX_SIGMA:
            raise ValueError(f"epsilon {epsilon:g} at delta {delta:g} needs a noise multiplier above {_MAX_SIGMA:g}")
    while high - low > rtol * high:
        mid = (low + high) / 2
        low, high = (low, mid) if cost(mid) <= epsilon else (mid, high)
    return low if lower and low > 0 else high


def gaussian_noise_std(*, epsilon: float, delta: float, sensitivity: float, count: int = 1) -> float:
    """Noise standard deviation for ``count`` Gaussian releases of L2 ``sensitivity`` costing ``epsilon``."""
    if not math.isfinite(sensitivity) or sensitivity <= 0:
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    return gaussian_noise_multiplier(epsilon=epsilon, delta=delta, count=count) * sensitivity


# ---------------------------------------------------------------------------------------------
# Composition


def _rdp_module() -> ModuleType:
    """``opacus.accountants.analysis.rdp``, loaded without importing torch if Opacus is not loaded.

    Importing ``opacus`` imports torch and the privacy engine (about 2 s); the RDP analysis
    needs only numpy and scipy. A ClientApp answering a census or a meta round should not pay
    for torch, so when Opacus is not imported yet the same file is loaded on its own.
    """
    if "opacus" not in sys.modules:
        module = _load_rdp_file()
        if module is not None:
            return module
    from opacus.accountants.analysis import rdp

    return rdp


@functools.cache
def _load_rdp_file() -> ModuleType | None:
    spec = importlib.util.find_spec("opacus")  # a top-level spec: does not import opacus
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
    file_spec = importlib.util.spec_from_file_location("_genofed_opacus_rdp", path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        return None  # Opacus moved the file: fall back to the normal import
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1024)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step at every order in :data:`ORDERS` (cached: it is the costly part)."""
    return _unit_rdp_uncached(noise_multiplier, sample_rate)


def _unit_rdp_uncached(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    rdp = _rdp_module().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(ORDERS))
    return tuple(float(v) for v in rdp)


def _epsilon_of(steps_by_mechanism: Mapping[tuple[float, float], int], *, delta: float,
                cache: bool = True) -> float:
    """Epsilon at ``delta`` of the composition of ``steps`` steps of each (sigma, q)."""
    if not steps_by_mechanism:
        return 0.0
    unit = _unit_rdp if cache else _unit_rdp_uncached
    total = [0.0] * len(ORDERS)
    for (sigma, q), steps in steps_by_mechanism.items():
        total = [t + steps * r for t, r in zip(total, unit(sigma, q), strict=True)]
    with warnings.catch_warnings():
        # Opacus warns when the best order is the first or last one: the bound is then looser
        # than more orders would make it, never wrong.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = _rdp_module().get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return max(0.0, float(eps))


def epsilon_of(releases: Iterable[Release], *, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` composed on their own (as the ledger composes them)."""
    return _epsilon_of(_mechanisms(releases), delta=delta)


def _mechanisms(releases: Iterable[Release]) -> dict[tuple[float, float], int]:
    out: dict[tuple[float, float], int] = {}
    for r in releases:
        out[(r.noise_multiplier, r.sample_rate)] = out.get((r.noise_multiplier, r.sample_rate), 0) + r.steps
    return out


# ---------------------------------------------------------------------------------------------
# The ledger


class PrivacyLedger:
    """A site's privacy ledger, stored in its vault. Open it with :meth:`open` (or :meth:`load`).

    Queries (:meth:`spent_epsilon`, :meth:`per_round`, ...) answer from the ledger as last read
    (at open, or by :meth:`refresh`, :meth:`charge`, :meth:`set_budget`); :meth:`charge` and
    :meth:`set_budget` always work on the latest ledger on disk.
    """

    def __init__(self, vault: Vault, *, site: str, doc: dict[str, Any]) -> None:
        self._vault, self._site, self._doc = vault, site, doc

    def __repr__(self) -> str:
        return (f"PrivacyLedger(site={self._site!r}, epsilon {self.spent_epsilon():.4g} of "
                f"{self.budget_epsilon:g}, delta {self.delta:g}, {len(self._doc['charges'])} charges)")

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, vault: Vault, *, site: str, default_epsilon: float = DEFAULT_EPSILON,
             default_delta: float = DEFAULT_DELTA) -> PrivacyLedger:
        """The ledger of ``vault``, created with budget (``default_epsilon``, ``default_delta``) if absent.

        The budget is the site's own setting, recorded when the ledger is created; later opens
        keep the recorded budget and ignore the defaults (change it with :meth:`set_budget`).

        Raises
        ------
        LedgerError
            Invalid defaults, an unreadable ledger, or the ledger lock stayed busy.
        VaultError
            The ledger blob fails authentication (edited, truncated, swapped) or cannot be written.
        """
        if not isinstance(site, str) or not site:
            raise LedgerError(f"{vault.path}: the site name must be a non-empty string, got {site!r}")
        doc = _latest(vault)
        if doc is None:
            _check_budget_numbers(epsilon=default_epsilon, delta=default_delta, error=LedgerError)
            with ledger_lock(vault.path):
                doc = _latest(vault)  # another process may have created it while we waited
                if doc is None:
                    doc = _new_doc(site=site, epsilon=float(default_epsilon), delta=float(default_delta))
                    _write(vault, doc)
        return cls(vault, site=site, doc=doc)

    @classmethod
    def load(cls, vault: Vault) -> PrivacyLedger:
        """The existing ledger of ``vault``, read only (the site name is the one recorded).

        Raises
        ------
        LedgerError
            The vault has no ledger yet.
        """
        doc = _latest(vault)
        if doc is None:
            raise LedgerError(f"{vault.path}: has no privacy ledger yet (nothing was ever released from it); "
                              "set its budget with `genofed ledger set-budget`")
        return cls(vault, site=str(doc["site"]), doc=doc)

    @staticmethod
    def exists(vault: Vault) -> bool:
        """Whether ``vault`` holds a ledger (nothing is decrypted)."""
        _refresh_vault(vault)
        return LEDGER_ROLE in vault

    def refresh(self) -> PrivacyLedger:
        """Re-read the ledger from the vault (another process may have charged); returns self."""
        doc = _latest(self._vault)
        if doc is None:
            raise LedgerError(f"{self._vault.path}: the privacy ledger disappeared from the vault; {_RESTORE}")
        self._doc = doc
        return self

    # -- reading -------------------------------------------------------------------------------

    @property
    def site(self) -> str:
        """The site name given at open (for messages), or the recorded one for :meth:`load`."""
        return self._site

    @property
    def vault(self) -> Vault:
        """The vault holding the ledger."""
        return self._vault

    @property
    def budget_epsilon(self) -> float:
        """The site's epsilon budget."""
        return float(self._doc["budget"]["epsilon"])

    @property
    def delta(self) -> float:
        """The delta at which every epsilon of this ledger is stated."""
        return float(self._doc["budget"]["delta"])

    @property
    def created_at(self) -> str:
        """When this ledger was created (UTC ISO 8601): tells one ledger from a re-created one."""
        return str(self._doc["created_at"])

    @property
    def revision(self) -> int:
        """Number of writes to the ledger so far (creation included)."""
        return int(self._doc["revision"])

    @property
    def releases(self) -> tuple[Release, ...]:
        """Every release charged so far, oldest first."""
        return tuple(r for charge in self._doc["charges"] for r in _charge_releases(charge))

    @property
    def budget_history(self) -> list[dict[str, Any]]:
        """Every budget setting: creation, then each change, with its UTC time."""
        return [dict(entry) for entry in self._doc["budget_history"]]

    def spent_epsilon(self) -> float:
        """Epsilon (at :attr:`delta`) of all releases so far, composed with Renyi DP."""
        return _epsilon_of(_mechanisms(self.releases), delta=self.delta)

    def remaining_epsilon(self) -> float:
        """Budget minus spend, never below zero."""
        return max(0.0, self.budget_epsilon - self.spent_epsilon())

    def would_spend(self, releases: Release | Iterable[Release]) -> float:
        """Epsilon the site would have spent after also releasing ``releases`` (nothing is written)."""
        return _epsilon_of(_mechanisms([*self.releases, *_as_list(releases)]), delta=self.delta)

    def per_round(self) -> list[dict[str, Any]]:
        """One row per charge: ``charge``, ``at``, ``run_id``, ``round``, ``labels``, ``releases``,
        ``mechanisms`` (``[kind, noise_multiplier, sample_rate, steps]`` each), ``epsilon`` (the
        site's total after it, at the current delta) and ``increase``. This is what run output shows.
        """
        rows, steps, before = [], {}, 0.0
        for charge in self._doc["charges"]:
            releases = _charge_releases(charge)
            for key, n in _mechanisms(releases).items():
                steps[key] = steps.get(key, 0) + n
            after = _epsilon_of(steps, delta=self.delta)
            rows.append({"charge": charge["seq"], "at": charge["at"], "run_id": charge["run_id"],
                         "round": charge["round"], "labels": sorted({r.label for r in releases}),
                         "releases": len(releases),
                         "mechanisms": [[r.kind, r.noise_multiplier, r.sample_rate, r.steps] for r in releases],
                         "epsilon": after, "increase": after - before})
            before = after
        return rows

    def to_summary(self) -> dict[str, Any]:
        """Budget, delta, spend and per-run totals: no patient data, safe to send to the coordinator.

        ``runs[run_id]["epsilon"]`` is that run's releases alone; runs compose sub-additively, so
        the runs' epsilons add up to more than ``spent_epsilon``.
        """
        spent = self.spent_epsilon()
        runs: dict[str, dict[str, Any]] = {}
        for row in self.per_round():
            run = runs.setdefault(row["run_id"], {"charges": 0, "releases": 0, "first_at": row["at"]})
            run["charges"] += 1
            run["releases"] += row["releases"]
            run["last_at"], run["epsilon_after"] = row["at"], row["epsilon"]
        for run_id, run in runs.items():
            own = [r for r in self.releases if r.run_id == run_id]
            run["epsilon"] = _epsilon_of(_mechanisms(own), delta=self.delta)
        return {"site": self._site, "accountant": "rdp", "budget_epsilon": self.budget_epsilon,
                "delta": self.delta, "spent_epsilon": spent, "remaining_epsilon": max(0.0, self.budget_epsilon - spent),
                "charges": len(self._doc["charges"]), "releases": len(self.releases), "runs": runs}

    # -- writing -------------------------------------------------------------------------------

    def charge(self, releases: Release | Iterable[Release], *, require_within_budget: bool = True) -> float:
        """Record ``releases``; returns the new spend (see :meth:`record`)."""
        return self.record(releases, require_within_budget=require_within_budget)[1]

    def record(self, releases: Release | Iterable[Release], *,
               require_within_budget: bool = True) -> tuple[int, float]:
        """Record ``releases`` (one round's, all with the same run and round).

        Returns the charge's sequence number (unique in this ledger: 0 when ``releases`` is
        empty) and the site's new spend.

        Call it before the releases leave the site, and send them only if it returns. The ledger
        is re-read under the ledger lock, checked and written in one vault update, so concurrent
        charges are all kept and each budget check sees every earlier one.

        Raises
        ------
        PrivacyBudgetExceeded
            The spend would exceed the budget (and ``require_within_budget``); nothing is written.
        ValueError
            The releases name different runs or rounds.
        """
        batch = _as_list(releases)
        if not batch:
            return 0, self.spent_epsilon()
        run_id, round_ = _one_run_and_round(batch)
        with ledger_lock(self._vault.path):
            doc = self._latest_or_fail()
            prior = [r for charge in doc["charges"] for r in _charge_releases(charge)]
            delta, budget = float(doc["budget"]["delta"]), float(doc["budget"]["epsilon"])
            after = _epsilon_of(_mechanisms([*prior, *batch]), delta=delta)
            if require_within_budget and after > budget:
                spent = _epsilon_of(_mechanisms(prior), delta=delta)
                raise PrivacyBudgetExceeded(site=self._site, labels=sorted({r.label for r in batch}), run_id=run_id,
                                            round=round_, spent=spent, would_reach=after, budget=budget, delta=delta)
            seq = doc["charges"][-1]["seq"] + 1 if doc["charges"] else 1
            doc["charges"].append({"seq": seq, "at": _now(), "run_id": run_id, "round": round_,
                                   "releases": [r.to_json() for r in batch]})
            _write(self._vault, doc)
        self._doc = doc
        return seq, after

    def set_budget(self, *, epsilon: float, delta: float | None = None, allow_raise: bool = False) -> None:
        """Change the site's budget; it may only be tightened unless ``allow_raise``.

        A larger epsilon or a larger delta is a raise. Spend is always computed at the current
        delta, so changing delta re-states every epsilon of the ledger. A budget below the spend
        is allowed: the site then refuses every further release.

        Raises
        ------
        LedgerError
            Out-of-range numbers, or a raise without ``allow_raise``.
        """
        with ledger_lock(self._vault.path):
            doc = self._latest_or_fail()
            old_eps, old_delta = float(doc["budget"]["epsilon"]), float(doc["budget"]["delta"])
            new_delta = old_delta if delta is None else delta
            _check_budget_numbers(epsilon=epsilon, delta=new_delta, error=LedgerError)
            raised = epsilon > old_eps or new_delta > old_delta
            if raised and not allow_raise:
                raise LedgerError(f"{self._vault.path}: refusing to raise the privacy budget from epsilon "
                                  f"{old_eps:g}, delta {old_delta:g} to epsilon {epsilon:g}, delta {new_delta:g} "
                                  f"without allow_raise (--allow-raise); {_FIX_BUDGET}")
            if (epsilon, new_delta) == (old_eps, old_delta):
                self._doc = doc
                return
            doc["budget"] = {"epsilon": float(epsilon), "delta": float(new_delta)}
            doc["budget_history"].append({"at": _now(), "epsilon": float(epsilon), "delta": float(new_delta),
                                          "change": "raised" if raised else "lowered"})
            _write(self._vault, doc)
        self._doc = doc

    def _latest_or_fail(self) -> dict[str, Any]:
        doc = _latest(self._vault)
        if doc is None:
            # Someone removed the role: never silently start a new, empty ledger.
            raise LedgerError(f"{self._vault.path}: the privacy ledger disappeared from the vault; {_RESTORE}")
        return doc


_RESTORE = ("restore the vault from backup; a site must not start over with an empty ledger "
            "(its earlier releases still count)")


# ---------------------------------------------------------------------------------------------
# Storage


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_doc(*, site: str, epsilon: float, delta: float) -> dict[str, Any]:
    at = _now()
    return {"format": FORMAT, "version": VERSION, "site": site, "created_at": at, "accountant": "rdp",
            "revision": 0, "budget": {"epsilon": epsilon, "delta": delta},
            "budget_history": [{"at": at, "epsilon": epsilon, "delta": delta, "change": "created"}],
            "charges": []}


def _write(vault: Vault, doc: dict[str, Any]) -> None:
    doc["revision"] = int(doc["revision"]) + 1
    # allow_nan=False: a NaN or inf in the ledger would be a bug; fail before writing it.
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    vault.update(put={LEDGER_ROLE: data})


def _refresh_vault(vault: Vault) -> None:
    # Vault.read reloads its index only when a role or file is missing; a ledger blob left on
    # disk by a writer whose cleanup failed would then be read stale. Vault has no public
    # refresh yet, so call its reload-if-the-manifest-changed directly.
    vault._reload_if_changed()  # noqa: SLF001


def _latest(vault: Vault) -> dict[str, Any] | None:
    """The ledger as it is on disk now, or None if the vault has none."""
    _refresh_vault(vault)
    if LEDGER_ROLE not in vault:
        return None
    return _parse(vault.path, vault.read(LEDGER_ROLE))


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    def bad(reason: str) -> LedgerError:
        return LedgerError(f"{path}: the privacy ledger (role {LEDGER_ROLE!r}) is not valid ({reason}); {_RESTORE}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    version = doc.get("version")
    if isinstance(version, int) and version > VERSION:
        raise LedgerError(f"{path}: the privacy ledger is format version {version}, written by a newer genofed "
                          f"(this one reads version {VERSION}); upgrade genofed")
    if version != VERSION:
        raise bad(f"unsupported version {version!r}")
    try:
        _check_budget_numbers(epsilon=doc["budget"]["epsilon"], delta=doc["budget"]["delta"], error=ValueError)
        for charge in doc["charges"]:
            _charge_releases(charge)
        if not isinstance(doc["revision"], int) or not isinstance(doc["site"], str) \
                or not isinstance(doc["budget_history"], list):
            raise ValueError("revision, site or budget_history")
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"bad field: {exc}") from None
    return doc


def _charge_releases(charge: Mapping[str, Any]) -> list[Release]:
    return [Release(kind=r["kind"], noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"],
                    steps=r["steps"], label=r["label"], run_id=charge["run_id"], round=charge["round"])
            for r in charge["releases"]]


def _as_list(releases: Release | Iterable[Release]) -> list[Release]:
    batch = [releases] if isinstance(releases, Release) else list(releases)
    for r in batch:
        if not isinstance(r, Release):
            raise TypeError(f"expected Release objects, got {type(r).__name__}")
    return batch


def _one_run_and_round(batch: Sequence[Release]) -> tuple[str, int | None]:
    pairs = {(r.run_id, r.round) for r in batch}
    if len(pairs) != 1:
        raise ValueError(f"one charge holds the releases of one run and round; got {sorted(pairs, key=str)}; "
                         "charge them separately")
    return next(iter(pairs))


def _check_budget_numbers(*, epsilon: object, delta: object, error: type[Exception]) -> None:
    def number(x: object) -> bool:
        return _is_real(x) and math.isfinite(x)  # type: ignore[arg-type]

    if not number(epsilon) or epsilon <= 0:  # type: ignore[operator]
        raise error(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not number(delta) or not 0 < delta < 1:  # type: ignore[operator]
        raise error(f"delta must be a number in (0, 1), got {delta!r}")


@contextmanager
def ledger_lock(vault_path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on the folder holding the vault, for one read-check-write of the ledger.

    Not the vault folder itself: :meth:`Vault.update` locks that one, and flock locks taken
    through two descriptors conflict even within one process. The path is resolved so that two
    spellings of one vault share the lock.
    """
    with directory_lock(Path(vault_path).resolve().parent, wait_s=LOCK_WAIT_S) as free:
        if not free:
            raise LedgerError(f"{vault_path}: another process kept the privacy ledger locked for "
                              f"{LOCK_WAIT_S:g} s; try again when it has finished")
        yield
