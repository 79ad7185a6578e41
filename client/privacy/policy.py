"""A site's privacy policy: set on site by its privacy officer, never by the coordinator.

The policy says what the site will release at all (DP required or not, how test statistics
leave) and how much privacy loss it accepts (the budget over the site's lifetime, the most one
run may spend, delta). A run's settings are a *request*: :func:`check_request` compares them
with the policy and names every way they ask for more than it allows; a request for less
(a smaller epsilon or delta, no test statistics) is honoured.

Where it lives
--------------
The budget and delta are the privacy ledger's (``privacy/ledger``, with its history of every
change); the rest is the role ``privacy/policy`` of the vault (JSON, below), written atomically
with the ledger lock held. Both are created with :data:`DEFAULTS` when the cohort is imported,
or by the site itself the first time it answers a run if its vault predates policies; never
from anything the coordinator sends.

Format (``privacy/policy``, version 1)::

    {"format": "genofed-site-policy", "version": 1, "require_dp": true, "max_run_epsilon": 10.0,
     "test_statistics": "noised", "test_epsilon": 1.0,
     "history": [{"at", "change": {"key": [old, new]}}]}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from common.errors import GenofedError
from common.settings import TEST_STATISTICS, RunSettings

POLICY_ROLE = "privacy/policy"
FORMAT = "genofed-site-policy"
VERSION = 1


class PolicyError(GenofedError):
    """The policy cannot be read or set as asked; the message says why and what to do."""


class PolicyRefusal(GenofedError):
    """A run asks for more privacy loss than the site's policy allows; nothing was released.

    ``reasons`` lists every violation in one line each; the message joins them.
    """

    def __init__(self, *, site: str, reasons: list[str]) -> None:
        self.site, self.reasons = site, list(reasons)
        super().__init__(f"site {site} refuses the run: " + "; ".join(reasons))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and multiprocessing unpickle exceptions as cls(*args): keep keyword-only arguments.
        return (_rebuild_refusal, (self.site, self.reasons))


def _rebuild_refusal(site: str, reasons: list[str]) -> PolicyRefusal:
    return PolicyRefusal(site=site, reasons=reasons)


@dataclass(frozen=True)
class SitePolicy:
    """What the site allows. Field names are the ``genofed ledger policy`` options.

    Attributes
    ----------
    require_dp : refuse any run without differential privacy.
    budget_epsilon : the site's lifetime budget (stored in the ledger).
    delta : the delta every epsilon of the site is stated at (stored in the ledger); a run may
        ask for a smaller one, never a larger.
    max_run_epsilon : the most one run may spend (all its releases composed).
    test_statistics : ``"none"`` (no test statistics leave), ``"noised"`` (Gaussian noise
        calibrated to one patient, charged) or ``"exact"`` (uncharged, outside the guarantee).
    test_epsilon : the most a noised test-statistics release may spend.
    require_secure_sum : refuse any run whose additive releases would reach the coordinator one
        by one (``secure-sum = false``).
    distributed_noise : with secure sum, add only this site's share of a release's noise (the sum
        carries the calibrated noise while at least the threshold of sites contribute; against
        sites that pool their own noise with the coordinator's view, less: docs/security.md);
        ``False`` adds the whole noise whatever the run asks.
    stack_forest : allow runs whose hybrid stacks the site's own models, its forest and its GLM
        (fitted without DP, so the hybrid's predictions at the site are then outside the
        guarantee); ``False`` refuses any run with ``stack-forest = true``.
    """

    require_dp: bool = True
    budget_epsilon: float = 10.0
    delta: float = 1e-5
    max_run_epsilon: float = 10.0
    test_statistics: str = "noised"
    test_epsilon: float = 1.0
    require_secure_sum: bool = False
    distributed_noise: bool = True
    stack_forest: bool = True

    def __post_init__(self) -> None:
        for name in ("budget_epsilon", "max_run_epsilon", "test_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise PolicyError(f"policy {name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise PolicyError(f"policy delta must be in (0, 1), got {self.delta!r}")
        if self.test_statistics not in TEST_STATISTICS:
            raise PolicyError(f"policy test-statistics must be one of {', '.join(TEST_STATISTICS)}, "
                              f"got {self.test_statistics!r}")
        for name in ("require_dp", "require_secure_sum", "distributed_noise", "stack_forest"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"policy {name.replace('_', '-')} must be yes or no, got {getattr(self, name)!r}")

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SitePolicy:
        """Inverse of :meth:`state_dict`."""
        return cls(**state)

    def with_changes(self, **changes: Any) -> SitePolicy:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)


DEFAULTS = SitePolicy()
"""Protective defaults: DP required, epsilon 10 in all, at most 10 per run, delta 1e-5 (or
the smaller :func:`default_delta` for large cohorts), test statistics noised at epsilon 1."""


def default_delta(n_records: int) -> float:
    """1e-5, or 0.1 / n for cohorts above 10,000 records: delta well below 1 / n."""
    return min(1e-5, 0.1 / max(int(n_records), 1))


def check_request(policy: SitePolicy, settings: RunSettings) -> list[str]:
    """Every way ``settings`` ask for more than ``policy`` allows (empty when within it).

    The run's planned total spend is checked against the budget by the privacy façade
    (:meth:`client.privacy.facade.SitePrivacy.check_run`), which knows the site's counts.
    """
    reasons = []
    if policy.require_dp and not settings.dp:
        reasons.append("its policy requires differential privacy and the run asks for dp = false "
                       "(its privacy officer may allow it with `genofed ledger policy --require-dp no`)")
    if settings.dp:
        if settings.delta > policy.delta:
            reasons.append(f"the run asks for delta {settings.delta:g}, above the site's delta {policy.delta:g}")
        for key, value in (("epsilon", settings.epsilon),
                           *((("meta-epsilon", settings.meta_epsilon),) if settings.meta_fit_rounds else ()),
                           ("moments-epsilon", settings.moments_epsilon), ("glm-epsilon", settings.glm_epsilon),
                           *((("explanation-epsilon", settings.explanation_epsilon),) if settings.explain else ())):
            if value > policy.max_run_epsilon:
                reasons.append(f"the run asks for {key} {value:g}, above the site's max-run-epsilon "
                               f"{policy.max_run_epsilon:g}")
    if policy.require_secure_sum and not settings.secure_sum:
        reasons.append("its policy requires secure sum and the run asks for secure-sum = false (run with "
                       "secure-sum = true, or its privacy officer may allow it with "
                       "`genofed ledger policy --require-secure-sum no`)")
    if not policy.stack_forest and settings.stack_forest:
        reasons.append("its policy keeps its own forest and GLM (fitted without DP) out of the hybrid and the run "
                       "asks for stack-forest = true (run with stack-forest = false, or its privacy officer may allow "
                       "it with `genofed ledger policy --stack-forest yes`)")
    reasons += _check_test_statistics(policy, settings)
    return reasons


def _check_test_statistics(policy: SitePolicy, settings: RunSettings) -> list[str]:
    asked, allowed = settings.test_statistics, policy.test_statistics
    if TEST_STATISTICS.index(asked) > TEST_STATISTICS.index(allowed):
        return [f"the run asks for test-statistics = {asked}, the site's policy allows at most {allowed}"]
    if asked == "noised" and settings.test_epsilon > policy.test_epsilon:
        return [f"the run asks for test-epsilon {settings.test_epsilon:g}, above the site's test-epsilon "
                f"{policy.test_epsilon:g}"]
    return []


# ---------------------------------------------------------------------------------------------
# Storage (the non-budget part; the budget is the ledger's)

STORED = ("require_dp", "max_run_epsilon", "test_statistics", "test_epsilon", "require_secure_sum",
          "distributed_noise", "stack_forest")
ADDED_LATER = {"require_secure_sum": False, "distributed_noise": True, "stack_forest": True}
"""Stored keys a policy written before them lacks, with the value such a policy meant."""


def policy_blob(policy: SitePolicy, *, history: list[dict[str, Any]] | None = None) -> bytes:
    """The ``privacy/policy`` role's bytes for ``policy``."""
    doc = {"format": FORMAT, "version": VERSION, **{k: getattr(policy, k) for k in STORED},
           "history": history if history is not None else [{"at": _now(), "change": "created"}]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def parse_policy_blob(raw: bytes, *, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stored fields and history of a ``privacy/policy`` blob.

    Raises
    ------
    PolicyError
        Not a policy of a version this genofed reads.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PolicyError(f"{where}: the site policy is not valid JSON; restore the vault from backup") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PolicyError(f"{where}: the site policy has no {FORMAT!r} format; restore the vault from backup")
    if doc.get("version") != VERSION:
        raise PolicyError(f"{where}: the site policy is version {doc.get('version')!r}; this genofed reads "
                          f"version {VERSION} (upgrade genofed)")
    missing = [k for k in STORED if k not in doc and k not in ADDED_LATER]
    if missing:
        raise PolicyError(f"{where}: the site policy lacks {', '.join(missing)}; restore the vault from backup")
    return {k: doc.get(k, ADDED_LATER.get(k)) for k in STORED}, list(doc.get("history", []))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def history_entry(old: SitePolicy, new: SitePolicy) -> dict[str, Any] | None:
    """What changed from ``old`` to ``new`` (None when nothing did)."""
    change = {k.replace("_", "-"): [getattr(old, k), getattr(new, k)] for k in asdict(old)
              if getattr(old, k) != getattr(new, k)}
    return {"at": _now(), "change": change} if change else None
