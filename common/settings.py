"""Run settings: ``[tool.flwr.app.config]`` (kebab-case, as Flower apps do) as one typed object.

Both sides parse the same Flower run config (``context.run_config``: the app's defaults in
``pyproject.toml`` plus ``flwr run --run-config`` overrides) into :class:`RunSettings` once, at
the top of the ServerApp and of every ClientApp handler. Messages carry only the facts of one
exchange (:class:`RoundFacts`: run id, round, model layout, coefficients), never settings, so a
site never reads a privacy-relevant number from a message: what it is asked for is the run
config, which it checks against its own policy.

Every field's default equals the key's default in ``pyproject.toml`` (a test asserts it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from common.errors import GenofedError

TEST_STATISTICS = ("none", "noised", "exact")
"""How test statistics leave a site, strictest first."""

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
SUM_STRATEGIES = ("fedavg", "fedprox", "fedadam")
"""Strategies that need only the sum of the sites' updates (the rest read each site's: not with ``secure-sum``)."""


class SettingsError(GenofedError):
    """A run-config value is missing, of the wrong kind or out of range."""


@dataclass(frozen=True)
class RunSettings:
    """What a run asks for. Field names are the run-config keys with ``_`` for ``-``.

    The privacy-relevant fields (``dp``, ``epsilon``, ``delta``, ``meta_epsilon``,
    ``test_statistics``, ``test_epsilon``) are a *request*: every site checks them against its own
    policy and refuses a run that asks for more privacy loss than the policy allows.
    """

    run_dir: str = ""
    resume: bool = False
    seed: int = 0
    min_sites: int = 2
    wait_timeout: float = 120.0
    round_timeout: float = 600.0
    cnn_rounds: int = 10
    local_epochs: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01        # fedprox only
    server_lr: float = 0.01          # fedadam
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    trim_beta: float = 0.2           # fedtrimmedavg
    krum_byzantine: int = 0          # krum
    max_update_norm: float = 0.0     # 0: derived from lr, steps and clipping (server/validation.py)
    dp: bool = True
    epsilon: float = 8.0             # DP-SGD epsilon of the whole run, per site
    delta: float = 0.0               # 0: each site's own policy delta
    max_grad_norm: float = 1.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    arch: str = "cnn"
    forest_trees: int = 200
    moments_epsilon: float = 2.0     # under DP: epsilon of the shared preprocessing's moments
    glm_rounds: int = 8              # federated Newton rounds of the GLM at most (stops when converged); 1 under DP
    glm_epsilon: float = 1.0         # under DP: the epsilon of the GLM's one noised gradient
    glm_c: float = 0.1               # the GLM's inverse L2 penalty (the objective sums over records)
    glm_max_features: int = 256      # the GLM reads at most this many shared columns
    glm_dp_columns: int = 32         # under DP it reads at most this many (its noise grows with their root)
    glm_dp_max_features: int = 16    # under DP the GLM keeps this many columns: the largest of its one noised step
    meta_rounds: int = 8             # federated Newton rounds of the meta-classifier at most (stops when converged)
    meta_dp_rounds: int = 0          # under DP: its noised Newton rounds (meta-epsilon spread over them); 0: public
    #                                  weights (the base models averaged), no meta statistics released
    meta_epsilon: float = 1.0        # under DP: the meta statistics' epsilon over all meta rounds
    meta_c: float = 1.0
    meta_tol: float = 1e-10
    meta_positive: bool = True       # non-negative stacking: no model's weight on its own evidence goes below 0
    stack_forest: bool = True        # the hybrid stacks the site's own forest and GLM (fitted without DP); false: not
    #                                  them, only the deep model and the federated GLM
    calibrate_site_models: bool = True  # the site models' stacking inputs scaled by Platt's slope out of fold (client/calibration.py)
    meta_fallback_margin: float = 0.0  # the stack is kept only if its validation AUC beats its best base model's by more than this many standard errors
    meta_dp_fallback_margin: float = 1.0  # under DP, the same margin (the one-standard-error rule: noised meta statistics)
    site_average_margin: float = 0.5  # a site model alone replaces the site's two models averaged only if it leads them on validation by more than this many standard errors
    test_statistics: str = "noised"  # none | noised | exact: how sites release test statistics
    test_epsilon: float = 1.0        # epsilon of the one test-statistics release (noised), and of the validation one
    init_from: str = ""              # start the deep model from an earlier run directory or checkpoint file
    hold_out_site: str = ""          # a site that does not train and joins only the evaluation
    site_alone: bool = True          # each site also trains its own models alone and reports them (what federation bought)
    paired_tests: bool = True        # sites also release the hybrid's discordant counts against each base model (McNemar)
    explain: bool = True             # phase 5: a global explanation from the sites' clipped, noised attribution sums
    explanation_epsilon: float = 1.0  # under DP: the epsilon of each site's one explanation release
    explanation_patients: int = 300  # each site explains at most this many validation patients (a seeded sample)
    motif_k: int = 6                 # k-mer length of the deep model's motifs
    motif_bins: int = 8              # position bins motifs are located in
    target_sensitivity: float = 0.0  # binary operating threshold: 0 = Youden's J on validation, else this sensitivity
    secure_sum: bool = False         # additive releases reach the coordinator only as a masked sum (common/secure_sum.py)
    secure_sum_threshold: int = 0    # sites whose shares rebuild a mask: 0 = more than half of the census's training sites
    distributed_noise: bool = True   # with secure-sum under DP: each site adds its share of the noise, the sum carries it all
    ledger_registry: str = ""        # coordinator file remembering each site's ledger (server/ledger_registry.py)
    sites_dir: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"run config strategy = {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.test_statistics not in TEST_STATISTICS:
            raise SettingsError(f"run config test-statistics = {self.test_statistics!r}: choose one of "
                                f"{', '.join(TEST_STATISTICS)}")
        positive = ("epsilon", "meta_epsilon", "test_epsilon", "explanation_epsilon", "moments_epsilon", "glm_epsilon", "glm_c", "max_grad_norm", "lr", "wait_timeout",
                    "round_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingsError(f"run config {_key(name)} = {getattr(self, name)!r}: must be > 0")
        at_least_one = ("cnn_rounds", "local_epochs", "batch_size", "meta_rounds", "min_sites", "forest_trees",
                        "glm_rounds", "glm_max_features", "glm_dp_columns", "glm_dp_max_features",
                        "explanation_patients", "motif_bins")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise SettingsError(f"run config {_key(name)} = {getattr(self, name)!r}: must be at least 1")
        if not 0 <= self.delta < 1:
            raise SettingsError(f"run config delta = {self.delta!r}: must be in [0, 1) (0: each site's own delta)")
        if not 1 <= self.motif_k <= 8:
            raise SettingsError(f"run config motif-k = {self.motif_k!r}: must be 1-8 (4^k k-mers are summed)")
        if not 0 <= self.target_sensitivity < 1:
            raise SettingsError(f"run config target-sensitivity = {self.target_sensitivity!r}: must be in [0, 1) "
                                "(0: Youden's J)")
        if self.meta_dp_rounds < 0:
            raise SettingsError(f"run config meta-dp-rounds = {self.meta_dp_rounds!r}: must be >= 0 (0: public "
                                "weights under DP, no meta statistics released)")
        if not self.meta_fallback_margin >= 0:
            raise SettingsError(f"run config meta-fallback-margin = {self.meta_fallback_margin!r}: must be >= 0 "
                                "(standard errors of the best base model's validation AUC)")
        if not self.meta_dp_fallback_margin >= 0:
            raise SettingsError(f"run config meta-dp-fallback-margin = {self.meta_dp_fallback_margin!r}: must be >= 0 "
                                "(standard errors of the best base model's validation AUC)")
        if not self.site_average_margin >= 0:
            raise SettingsError(f"run config site-average-margin = {self.site_average_margin!r}: must be >= 0 "
                                "(standard errors of the best base model's validation AUC)")
        if self.secure_sum and self.strategy not in SUM_STRATEGIES:
            raise SettingsError(f"run config strategy = {self.strategy!r} reads each site's update, which secure-sum "
                                f"hides: choose one of {', '.join(SUM_STRATEGIES)} or secure-sum = false")
        if self.secure_sum and self.hold_out_site:
            raise SettingsError(f"run config hold-out-site = {self.hold_out_site!r} reports one site's statistics, "
                                "which secure-sum hides: leave hold-out-site empty or set secure-sum = false")
        if self.secure_sum_threshold < 0:
            raise SettingsError(f"run config secure-sum-threshold = {self.secure_sum_threshold!r}: must be >= 0 "
                                "(0: more than half of the sites)")
        if self.max_update_norm < 0:
            raise SettingsError(f"run config max-update-norm = {self.max_update_norm!r}: must be >= 0 "
                                "(0: derived from the run's settings)")

    @property
    def glm_width(self) -> int:
        """The shared columns the federated GLM reads at most (``glm-max-features``; under DP also
        ``glm-dp-columns``). A utility choice, not a privacy one: each record's gradient is clipped to
        a norm that grows with the root of the width, so the noise does too (docs/learning.md, "The DP
        GLM against its budget")."""
        return min(self.glm_max_features, self.glm_dp_columns) if self.dp else self.glm_max_features

    @property
    def releases_site_alone(self) -> bool:
        """Whether the sites train their own models alone and release their statistics: per-site
        figures by nature, so not under ``secure-sum`` (which shows the coordinator sums only)."""
        return self.site_alone and not self.secure_sum

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> RunSettings:
        """Settings from a Flower run config (unknown keys are ignored: they belong to Flower).

        Raises
        ------
        SettingsError
            A value of the wrong kind or out of range, naming the key.
        """
        values = {}
        for f in fields(cls):
            key = _key(f.name)
            if key not in cfg:
                continue
            try:
                values[f.name] = _coerce(cfg[key], type(f.default))
            except (TypeError, ValueError):
                raise SettingsError(f"run config {key} = {cfg[key]!r}: expected "
                                    f"{type(f.default).__name__}") from None
        return cls(**values)

    @property
    def fallback_margin(self) -> float:
        """The stacking fallback's margin in force (standard errors): ``meta-dp-fallback-margin``
        under DP, else ``meta-fallback-margin``. Under DP the meta statistics are noised and the
        candidates' true differences at these validation sizes are small against their error, so a
        fitted stack must beat the best base model clearly (docs/learning.md, "The site models
        averaged rather than one chosen")."""
        return self.meta_dp_fallback_margin if self.dp else self.meta_fallback_margin

    @property
    def glm_fit_rounds(self) -> int:
        """GLM rounds the run takes at most: ``glm-rounds`` Newton rounds, or under DP the one
        round of a noised gradient with a public curvature (:mod:`common.glm`)."""
        return 1 if self.dp else self.glm_rounds

    @property
    def meta_fit_rounds(self) -> int:
        """Meta-classifier rounds the run takes at most: ``meta-rounds`` Newton rounds until
        converged, or under DP exactly ``meta-dp-rounds``: each is a release charged to the sites'
        budgets, planned before the run, and without a released objective convergence cannot be
        judged, so the number is fixed in advance (0 by default: :attr:`public_meta_weights`)."""
        return self.meta_dp_rounds if self.dp else self.meta_rounds

    @property
    def public_meta_weights(self) -> bool:
        """Under DP with ``meta-dp-rounds = 0`` the stack's weights are public: the base models'
        (calibrated) log-odds averaged with equal weights, and the reduced stacks the same average
        without some models, chosen on the one validation release. No meta statistics are released:
        in the measured DP runs the noised Newton steps never chose better than these public
        weights (docs/learning.md, "Public stacking weights under DP")."""
        return self.dp and self.meta_dp_rounds == 0

    def to_run_config(self) -> dict[str, Any]:
        """The run config that parses back into these settings (kebab-case keys)."""
        return {_key(k): v for k, v in asdict(self).items()}

    def release_settings(self) -> dict[str, Any]:
        """The settings a site's releases depend on (not where results go or how long to wait).

        A site stores each release with a digest of these (and the exchange's facts), so that a
        coordinator resumed with ``resume = true`` gets the same release back, charged once.
        """
        operational = {"run-dir", "resume", "wait-timeout", "round-timeout", "ledger-registry", "sites-dir",
                       "min-sites"}
        return {k: v for k, v in self.to_run_config().items() if k not in operational}

    @property
    def fedprox_mu(self) -> float:
        """The proximal term a site adds to its local loss (0 unless the strategy is FedProx)."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    return kind(value)


@dataclass(frozen=True)
class RoundFacts:
    """The facts of one exchange that a message carries (never settings).

    Attributes
    ----------
    run_id : the genofed run id (sites key per-run state and ledger charges by it).
    server_round : the round within its phase (0 for one-off exchanges).
    model_config : the deep model's layout as JSON (derived from the agreed schema).
    coef : the coefficients being fitted (GLM or meta rounds) or the meta-classifier's (evaluation).
    glm_coef : the fitted GLM's coefficients (meta rounds and evaluation).
    thresholds : the operating thresholds (probability of class 1) per model, in
        ``client.handlers.MODEL_NAMES`` order (evaluation of a binary problem).
    warm_start : first GLM or meta round without DP: also return the local fit.
    explanation : the run's global explanation as JSON (evaluation: the site stores it with the
        final models).
    secure : with secure sum, this release's label, participants (roster indices) and roster
        digest as JSON (:mod:`common.secure_sum`); empty for a plain reply.
    """

    run_id: str
    server_round: int = 0
    model_config: str = ""
    coef: tuple[float, ...] = field(default_factory=tuple)
    glm_coef: tuple[float, ...] = field(default_factory=tuple)
    thresholds: tuple[float, ...] = field(default_factory=tuple)
    warm_start: bool = False
    explanation: str = ""
    secure: str = ""

    def to_config(self) -> dict[str, Any]:
        """ConfigRecord-ready values (kebab-case keys)."""
        out: dict[str, Any] = {"run-id": self.run_id, "server-round": int(self.server_round),
                               "warm-start": bool(self.warm_start)}
        if self.model_config:
            out["model-config"] = self.model_config
        if self.coef:
            out["coef"] = [float(c) for c in self.coef]
        if self.glm_coef:
            out["glm-coef"] = [float(c) for c in self.glm_coef]
        if self.thresholds:
            out["thresholds"] = [float(c) for c in self.thresholds]
        if self.explanation:
            out["explanation"] = self.explanation
        if self.secure:
            out["secure"] = self.secure
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RoundFacts:
        """Parse a message's config (other keys are ignored: settings come from the run config)."""
        try:
            return cls(run_id=str(cfg["run-id"]), server_round=int(cfg.get("server-round", 0)),
                       model_config=str(cfg.get("model-config", "")),
                       coef=tuple(float(c) for c in cfg.get("coef", ())),
                       glm_coef=tuple(float(c) for c in cfg.get("glm-coef", ())),
                       thresholds=tuple(float(c) for c in cfg.get("thresholds", ())),
                       warm_start=bool(cfg.get("warm-start", False)),
                       explanation=str(cfg.get("explanation", "")), secure=str(cfg.get("secure", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SettingsError(f"message config is not a genofed exchange: {exc!r}") from None

    def model(self) -> dict[str, Any]:
        """The model layout as a dict."""
        return json.loads(self.model_config)
