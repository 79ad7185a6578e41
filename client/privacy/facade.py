"""The privacy façade: the one way a handler releases anything computed from the site's patients.

A handler opens :class:`SitePrivacy` for the message it answers, then

1. :meth:`~SitePrivacy.check` the run's settings against the site's policy (every handler, not
   only the census: a coordinator cannot change its request half-way);
2. :meth:`~SitePrivacy.plan_run` / :meth:`~SitePrivacy.check_run` (census): the run's whole
   planned spend must fit both ``max-run-epsilon`` and the remaining budget before anything is
   spent;
3. :meth:`~SitePrivacy.release` each mechanism *before* computing what it protects: the
   release is checked against the budget and charged to the ledger, and its random seed is
   derived from the vault key, the run id and the charge's sequence number (unique in the
   ledger, assigned under the ledger lock), so two handlers of one site never draw the same
   noise and the coordinator, which knows neither the key nor the sequence, cannot replay it;
4. the ClientApp then checks the reply against the egress contract and logs it
   (:meth:`~SitePrivacy.log_reply`), with the epsilon this message charged.

Opacus' habits: keyword-only arguments; :meth:`SitePrivacy.state_dict` is the serialisable view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from client.privacy.egress import EgressLog, Observed, log_entry
from client.privacy.ledger import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    dpsgd_noise_multiplier,
    gaussian_noise_multiplier,
    ledger_lock,
)
from client.privacy.policy import (
    DEFAULTS,
    POLICY_ROLE,
    STORED,
    PolicyError,
    PolicyRefusal,
    SitePolicy,
    check_request,
    default_delta,
    history_entry,
    parse_policy_blob,
    policy_blob,
)
from common.settings import RunSettings


def ensure_site_privacy(vault: Any, *, site: str, n_records: int) -> None:
    """Create the site's ledger and policy with the protective defaults if the vault has none.

    Called at import and by the façade: a vault that predates policies gets the site's own
    defaults, never values a coordinator sent.
    """
    if not PrivacyLedger.exists(vault):
        PrivacyLedger.open(vault, site=site, default_epsilon=DEFAULTS.budget_epsilon,
                           default_delta=default_delta(n_records))
    vault._reload_if_changed()  # noqa: SLF001 - another process may have written it
    if POLICY_ROLE not in vault:
        with ledger_lock(vault.path):
            vault._reload_if_changed()  # noqa: SLF001
            if POLICY_ROLE not in vault:
                vault.update({POLICY_ROLE: policy_blob(DEFAULTS)})


def load_policy(vault: Any) -> SitePolicy:
    """The site's policy: the ``privacy/policy`` role with the ledger's budget and delta.

    Raises
    ------
    PolicyError
        The vault has no policy (import the cohort with this genofed, or set one with
        ``genofed ledger policy``), or it cannot be read.
    """
    vault._reload_if_changed()  # noqa: SLF001
    if POLICY_ROLE not in vault or not PrivacyLedger.exists(vault):
        raise PolicyError(f"{vault.path}: has no site policy yet; show or set it with `genofed ledger policy`")
    stored, _ = parse_policy_blob(vault.read(POLICY_ROLE), where=str(vault.path))
    ledger = PrivacyLedger.load(vault)
    return SitePolicy(budget_epsilon=ledger.budget_epsilon, delta=ledger.delta, **stored)


def policy_history(vault: Any) -> list[dict[str, Any]]:
    """Every change of the non-budget policy (the budget's are in the ledger's history)."""
    vault._reload_if_changed()  # noqa: SLF001
    if POLICY_ROLE not in vault:
        return []
    return parse_policy_blob(vault.read(POLICY_ROLE), where=str(vault.path))[1]


def set_policy(vault: Any, *, site: str, n_records: int, allow_raise: bool = False, **changes: Any) -> SitePolicy:
    """Change the site's policy (on site only); returns the new one.

    Budget and delta go through the ledger (a raise needs ``allow_raise``); the other keys are
    written with their history under the ledger lock.

    Raises
    ------
    PolicyError
        An invalid value.
    client.privacy.ledger.LedgerError
        A budget raise without ``allow_raise``.
    """
    ensure_site_privacy(vault, site=site, n_records=n_records)
    old = load_policy(vault)
    new = old.with_changes(**changes)  # validates
    if (new.budget_epsilon, new.delta) != (old.budget_epsilon, old.delta):
        PrivacyLedger.load(vault).set_budget(epsilon=new.budget_epsilon, delta=new.delta, allow_raise=allow_raise)
    stored_old = {k: getattr(old, k) for k in STORED}
    stored_new = {k: getattr(new, k) for k in stored_old}
    if stored_new != stored_old:
        with ledger_lock(vault.path):
            history = policy_history(vault)
            entry = history_entry(old, new)
            vault.update({POLICY_ROLE: policy_blob(new, history=[*history, *([entry] if entry else [])])})
    return load_policy(vault)


class SitePrivacy:
    """A site's policy, ledger and egress log, for the one message being answered.

    Open it with :meth:`open`; every method takes keyword-only arguments.
    """

    def __init__(self, vault: Any, *, site: str, settings: RunSettings, run_id: str, policy: SitePolicy) -> None:
        self._vault, self._site, self._settings, self._run_id = vault, site, settings, run_id
        self._policy = policy
        self._ledger = PrivacyLedger.open(vault, site=site)
        self._charged: list[tuple[int, float]] = []   # (seq, epsilon increase) of this message
        self._replay_of: list[int] | None = None       # charges of a stored release this message sends again

    @classmethod
    def open(cls, vault: Any, *, site: str, settings: RunSettings, run_id: str, n_records: int) -> SitePrivacy:
        """The façade for one message of run ``run_id`` (creating site defaults if the vault has none)."""
        ensure_site_privacy(vault, site=site, n_records=n_records)
        return cls(vault, site=site, settings=settings, run_id=run_id, policy=load_policy(vault))

    # -- what the site allows ----------------------------------------------------------------

    @property
    def policy(self) -> SitePolicy:
        """The site's policy as read when the façade was opened."""
        return self._policy

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's ledger (re-read by every charge)."""
        return self._ledger

    @property
    def delta(self) -> float:
        """The run's delta: what the run asks for, or the site's own when it asks for none."""
        return self._settings.delta or self._policy.delta

    def check(self) -> None:
        """Refuse a run whose settings ask for more than the policy allows.

        Raises
        ------
        PolicyRefusal
            With every reason, one line each.
        """
        reasons = check_request(self._policy, self._settings)
        if reasons:
            raise PolicyRefusal(site=self._site, reasons=reasons)

    # -- the whole run's plan ----------------------------------------------------------------

    def plan_run(self, *, n_train: int) -> list[Release]:
        """Every release the run will make if it completes, as known before it starts.

        The shared preprocessing's moments, DP-SGD over ``cnn-rounds`` x ``local-epochs`` epochs
        (Poisson rate 1 / batches), the GLM's noised gradient, the meta-classifier
        statistics over ``meta-dp-rounds`` (none with public weights), the explanation summary (``explain``), and, when noised, one validation-statistics release (the
        operating thresholds and the stacking fallback, for any number of classes) and one
        test-statistics release. Calibrated with the ledger's accounting, which needs no more noise than
        training's, so what is charged later is at most this plan.
        """
        s = self._settings
        if not s.dp:
            return self._test_plan()
        batches = math.ceil(max(n_train, 1) / s.batch_size)
        steps = s.cnn_rounds * s.local_epochs * batches
        sigma = dpsgd_noise_multiplier(epsilon=s.epsilon, delta=self.delta, sample_rate=1.0 / batches, steps=steps)
        plan = [Release.gaussian(noise_multiplier=self.moments_noise_multiplier(), label="moments",
                                 run_id=self._run_id),
                Release(kind="dp-sgd", noise_multiplier=sigma, sample_rate=1.0 / batches, steps=steps,
                        label="cnn-update", run_id=self._run_id),
                Release.gaussian(noise_multiplier=self.glm_noise_multiplier(), label="glm-statistics",
                                 run_id=self._run_id, count=s.glm_fit_rounds)]
        if s.meta_fit_rounds:  # none with public weights (meta-dp-rounds = 0)
            plan.append(Release.gaussian(noise_multiplier=self.meta_noise_multiplier(), label="meta-statistics",
                                         run_id=self._run_id, count=s.meta_fit_rounds))
        if s.explain:
            plan.append(Release.gaussian(noise_multiplier=self.explanation_noise_multiplier(), label="explanation",
                                         run_id=self._run_id))
        return plan + self._test_plan()

    def _test_plan(self) -> list[Release]:
        if self._settings.test_statistics != "noised":
            return []
        return [Release.gaussian(noise_multiplier=self.test_noise_multiplier(), label=f"{split}-statistics",
                                 run_id=self._run_id) for split in ("validation", "test")]

    def check_run(self, plan: Sequence[Release]) -> float:
        """The plan's own epsilon, after refusing a plan that cannot finish within the policy.

        Raises
        ------
        PolicyRefusal
            The plan exceeds ``max-run-epsilon``, or the site's remaining budget.
        """
        from client.privacy.ledger import epsilon_of

        run_eps = epsilon_of(plan, delta=self._policy.delta)
        reasons = []
        if run_eps > self._policy.max_run_epsilon:
            reasons.append(f"the run's planned releases compose to epsilon {run_eps:.4g}, above the site's "
                           f"max-run-epsilon {self._policy.max_run_epsilon:g}")
        after = self._ledger.would_spend(plan)
        if after > self._policy.budget_epsilon:
            reasons.append(f"the run's planned releases would take the site's spend from epsilon "
                           f"{self._ledger.spent_epsilon():.4g} to {after:.4g}, above its budget "
                           f"{self._policy.budget_epsilon:g}; nothing was spent (ask for a smaller epsilon or fewer "
                           "rounds; or the site's privacy officer may raise the budget with "
                           "`genofed ledger policy --budget E --allow-raise`)")
        if reasons:
            raise PolicyRefusal(site=self._site, reasons=reasons)
        return run_eps

    def meta_noise_multiplier(self) -> float:
        """Noise multiplier of each meta round's release (``meta-epsilon`` over ``meta-dp-rounds``)."""
        s = self._settings
        return gaussian_noise_multiplier(epsilon=s.meta_epsilon, delta=self.delta, count=s.meta_fit_rounds)

    def moments_noise_multiplier(self) -> float:
        """Noise multiplier of the one release of the shared preprocessing's moments."""
        return gaussian_noise_multiplier(epsilon=self._settings.moments_epsilon, delta=self.delta)

    def glm_noise_multiplier(self) -> float:
        """Noise multiplier of each GLM round's release (``glm-epsilon`` over the DP run's GLM rounds)."""
        s = self._settings
        return gaussian_noise_multiplier(epsilon=s.glm_epsilon, delta=self.delta, count=s.glm_fit_rounds)

    def explanation_noise_multiplier(self) -> float:
        """Noise multiplier of the one explanation release (``explanation-epsilon``)."""
        return gaussian_noise_multiplier(epsilon=self._settings.explanation_epsilon, delta=self.delta)

    def test_noise_multiplier(self) -> float:
        """Noise multiplier of the one noised test-statistics release (``test-epsilon``)."""
        return gaussian_noise_multiplier(epsilon=self._settings.test_epsilon, delta=self.delta)

    # -- releases ----------------------------------------------------------------------------

    def release(self, releases: Release | Sequence[Release], *, purpose: str) -> int:
        """Check ``releases`` against the budget, charge them, and return their private seed.

        Call it before computing what the releases protect; send the result only if it returned.

        Raises
        ------
        PrivacyBudgetExceeded
            The charge would exceed the budget; nothing was charged.
        """
        batch = [releases] if isinstance(releases, Release) else list(releases)
        before = self._ledger.spent_epsilon()
        seq, after = self._ledger.record(batch)
        self._charged.append((seq, after - before))
        return self.seed(purpose=purpose, sequence=seq)

    def seed(self, *, purpose: str, sequence: int = 0, round: int = 0) -> int:
        """A seed only this site can compute: vault key, run id, purpose and charge sequence.

        Uncharged randomness (a forest, non-DP training) uses ``sequence=0`` and the round.
        """
        return int(self._vault.derive_seed(f"{purpose}|run-{self._run_id}|charge-{sequence}|round-{round}"))

    def refuse_over_budget(self, planned: Sequence[Release], *, round: int | None) -> None:
        """Refuse work whose planned releases would exceed the budget (before doing it).

        Raises
        ------
        PrivacyBudgetExceeded
        """
        after = self._ledger.refresh().would_spend(planned)
        if after > self._ledger.budget_epsilon:
            raise PrivacyBudgetExceeded(site=self._site, labels=sorted({r.label for r in planned}),
                                        run_id=self._run_id, round=round, spent=self._ledger.spent_epsilon(),
                                        would_reach=after, budget=self._ledger.budget_epsilon,
                                        delta=self._ledger.delta)

    @property
    def charged_epsilon(self) -> float:
        """How much the site's spend grew through this façade (this message's releases)."""
        return sum(inc for _, inc in self._charged)

    @property
    def charges(self) -> list[int]:
        """Sequence numbers of this message's charges."""
        return [seq for seq, _ in self._charged]

    # -- stored releases ---------------------------------------------------------------------

    def release_blob(self, arrays: dict[str, Any], values: dict[str, Any], *, request: str) -> bytes:
        """The vault blob of a release this message computed, naming the charges that paid for it."""
        from client.model_store import release_blob

        return release_blob(arrays, values, request=request, charges=self.charges)

    def stored_release(self, role: str, *, request: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The release stored under ``role`` for exactly ``request``, to be sent again uncharged.

        Its egress entry then names the charges that paid for it (``replay_of``): a site killed
        after storing a release and before logging it still has every charge tied to a reply.
        """
        from client.model_store import read_release

        got = read_release(self._vault, role, request=request)
        if got is None:
            return None
        self._replay_of = got[2]
        return got[0], got[1]

    # -- egress -------------------------------------------------------------------------------

    def log_reply(self, *, message_type: str, round: int, observed: Mapping[str, Mapping[str, Observed]],
                  status: str = "sent", reason: str = "", secure: Mapping[str, Any] | None = None) -> None:
        """Record one reply (or a blocked one) in the egress log, before it is sent; ``secure``
        notes a reply whose summed record left masked (its label, participants and length)."""
        entry = log_entry(run_id=self._run_id, message_type=message_type, round=round, observed=observed,
                          epsilon=self.charged_epsilon, status=status, reason=reason)
        entry["charges"] = self.charges
        if self._replay_of is not None:
            entry["replay_of"] = self._replay_of
        if secure:
            entry["secure_sum"] = dict(secure)
        with ledger_lock(self._vault.path):
            EgressLog(self._vault).append(entry)

    def state_dict(self) -> dict[str, Any]:
        """What this façade did and knows (plain data, no patient data)."""
        return {"site": self._site, "run_id": self._run_id, "policy": self._policy.state_dict(),
                "delta": self.delta, "charges": [list(c) for c in self._charged]}
