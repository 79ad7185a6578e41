"""Server-side aggregation of validated CNN updates, one class per selectable strategy.

The ServerApp drives its own round loop (push, pull, validate), so aggregation here works on
a plain list of already-received updates rather than through ``Strategy.start``. Where
Flower 1.42 has the arithmetic as a function callable without a running app, it is called
(so our numbers are Flower's numbers); where Flower keeps it inside ``aggregate_train``, which
needs ``Message`` objects, it is re-implemented below with the same numpy operations in the
same order, and ``tests/test_aggregation.py`` checks it against Flower's strategy bit for bit:

============== ========================================================================
fedavg         ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (called)
fedprox        as fedavg; sites add the proximal term (``proximal-mu`` in the run settings, ``RunSettings.fedprox_mu``)
fedadam        FedAvg (called) + ``FedAdam.aggregate_train``'s update (re-implemented)
fedmedian      ``FedMedian.aggregate_train``'s ``np.median`` (re-implemented, one line)
fedtrimmedavg  ``flwr.serverapp.strategy.fedtrimmedavg.trim_mean`` (called)
krum           ``flwr.serverapp.strategy.multikrum.select_multikrum`` (called)
============== ========================================================================

Conventions shared by all aggregators:

- Updates are full client weights plus ``num_examples``, already validated by
  :mod:`server.validation` (same names, shapes and dtypes as the global model).
- Only float arrays are aggregated. Non-float arrays are not trained (validation requires
  clients to return them unchanged), so the global values are carried through.
- Outputs keep the global model's dtypes. Flower's FedAdam promotes float32 weights to
  float64 (``eta_norm`` is a numpy float64 scalar); casting back keeps the next round's
  :class:`~server.validation.UpdateSpec` valid and the model loadable into torch.
- Deterministic: the same inputs in the same order give bit-identical outputs. The means
  (FedAvg, FedProx, FedAdam, FedTrimmedAvg) are float sums whose last bits depend on the
  order of the updates, so pass them in a stable order:
  :func:`server.validation.partition_replies` sorts them by site name. The median and
  Krum's choice do not depend on order (Krum up to exact ties in its scores).
- FedMedian, FedTrimmedAvg and Krum ignore ``num_examples`` (as in Flower); FedAvg, FedProx
  and FedAdam weight by it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.errors import GenofedError
from common.settings import STRATEGIES, RunSettings

from .validation import is_float_array

log = logging.getLogger(__name__)

AGGREGATORS = STRATEGIES

Arrays = dict[str, np.ndarray]
Update = tuple[Mapping[str, np.ndarray], int]

_WEIGHT_KEY = "num-examples"  # the MetricRecord key Flower's helpers weight by


def _records(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> list[RecordDict]:
    """Updates as the RecordDicts (one ArrayRecord, one MetricRecord) Flower's helpers read."""
    return [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                        "metrics": MetricRecord({_WEIGHT_KEY: int(n)})})
            for arrays, n in updates]


def weighted_mean(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Arrays:
    """FedAvg by Flower's ``aggregate_arrayrecords``: ``sum_i (n_i / sum_j n_j) * w_i``.

    The factors are Python floats and the sum runs in update order, in the arrays' dtype.
    """
    record = aggregate_arrayrecords(_records(updates), _WEIGHT_KEY)
    return {k: a.numpy() for k, a in record.items()}


class Aggregator(ABC):
    """Base class: turns the global weights and a round's updates into new global weights.

    Subclasses set :attr:`name` and :attr:`defaults` (parameters by run-config name) and
    implement :meth:`_combine` on the float arrays only.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, float | int]] = {}
    #: Flower's keyword names for the same parameters (``FedAdam(eta=...)``), also accepted.
    flower_names: ClassVar[dict[str, str]] = {}

    def __init__(self, **params: float | int) -> None:
        self.params: dict[str, float | int] = {**self.defaults, **params}
        self._check_params()

    def _check_params(self) -> None:
        """Raise :class:`GenofedError` for out-of-range parameters."""

    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Arrays:
        """New global weights from the round's accepted updates.

        Parameters
        ----------
        global_arrays : the global weights the clients trained from (name -> array).
        updates : ``(client_weights, num_examples)`` per accepted update, in a stable order.

        Returns
        -------
        dict
            Same names, order, shapes and dtypes as ``global_arrays``; fresh arrays.

        Raises
        ------
        ValueError
            No updates (the caller should keep the global model and log the round), or an
            update whose names or shapes differ from the global model's (validate first).
        """
        _check_updates(global_arrays, updates)
        floats = [k for k, g in global_arrays.items() if is_float_array(g)]
        combined = self._combine({k: global_arrays[k] for k in floats},
                                 [({k: np.asarray(a[k]) for k in floats}, int(n)) for a, n in updates])
        return {k: (np.asarray(combined[k]).astype(g.dtype, copy=False) if k in combined else np.array(g, copy=True))
                for k, g in global_arrays.items()}

    @abstractmethod
    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        """The strategy's rule on the float arrays (each subclass has one)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically after a restart (plain data and arrays)."""
        return {"name": self.name, "params": dict(self.params)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses state from another aggregator or other parameters.

        A resumed run with different parameters would not continue the interrupted one, so a
        mismatch is an error, not a silent change.
        """
        if state.get("name") != self.name:
            raise GenofedError(f"checkpoint holds {state.get('name')!r} aggregator state; this run uses {self.name!r}")
        saved = dict(state.get("params", {}))
        if saved != self.params:
            raise GenofedError(f"checkpoint was written with {self.name} parameters {saved}; "
                               f"this run has {self.params}: resume with the same run config")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def _check_updates(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update]) -> None:
    if not updates:
        raise ValueError("no updates to aggregate: keep the current global model for this round")
    for i, (arrays, _) in enumerate(updates):
        if set(arrays) != set(global_arrays):
            raise ValueError(f"update {i} has arrays {sorted(set(arrays) ^ set(global_arrays))} "
                             "that differ from the global model's: validate updates before aggregating")
        for k, g in global_arrays.items():
            if np.shape(arrays[k]) != np.shape(g):
                raise ValueError(f"update {i}: array '{k}' has shape {np.shape(arrays[k])}, expected {np.shape(g)}")


class FedAvgAggregator(Aggregator):
    """FedAvg (McMahan et al. 2017): ``w = sum_i n_i w_i / sum_i n_i``, by Flower's own helper."""

    name = "fedavg"

    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        return weighted_mean(updates)


class FedProxAggregator(FedAvgAggregator):
    """FedProx (Li et al. 2020): FedAvg on the server; clients add ``mu/2 ||w - w_global||^2``.

    Parameters (run config): ``proximal-mu`` >= 0 (Flower's default 0.0, which is FedAvg).
    """

    name = "fedprox"
    defaults = {"proximal-mu": RunSettings.proximal_mu}
    flower_names = {"proximal_mu": "proximal-mu"}

    def _check_params(self) -> None:
        self.params["proximal-mu"] = _real(self.params["proximal-mu"], "proximal-mu", low=0.0)
        if self.params["proximal-mu"] == 0.0:
            log.warning("fedprox with proximal-mu = 0 is plain FedAvg")


class FedAdamAggregator(Aggregator):
    r"""FedAdam (Reddi et al. 2021), exactly as Flower 1.42's ``FedAdam.aggregate_train``.

    With :math:`\bar w` the FedAvg of the updates, :math:`x` the global weights and
    :math:`t` the server round (1 for the first aggregation)::

        delta  = w_bar - x
        m      = beta1 * m + (1 - beta1) * delta             (m starts at 0)
        v      = beta2 * v + (1 - beta2) * delta**2          (v starts at 0)
        eta_t  = eta * sqrt(1 - beta2**(t + 1)) / (1 - beta1**(t + 1))
        x_new  = x + eta_t * m / (sqrt(v) + tau)

    ``eta_t`` is Flower's bias correction (Kingma & Ba's alpha_t); note Flower's exponent
    ``t + 1`` where Adam has ``t``. ``t`` is this aggregator's own count of aggregations, so it
    equals Flower's ``server_round`` when every round aggregates; it is part of the state.

    Parameters (run config): ``server-lr`` (eta, 0.1), ``server-beta1`` (0.9),
    ``server-beta2`` (0.99), ``server-tau`` (1e-3): Flower's defaults.
    """

    name = "fedadam"
    defaults = {"server-lr": RunSettings.server_lr, "server-beta1": RunSettings.server_beta1,
                "server-beta2": RunSettings.server_beta2, "server-tau": RunSettings.server_tau}
    flower_names = {"eta": "server-lr", "beta_1": "server-beta1", "beta_2": "server-beta2", "tau": "server-tau"}

    def __init__(self, **params: float | int) -> None:
        super().__init__(**params)
        self.step = 0
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def _check_params(self) -> None:
        p = self.params
        p["server-lr"] = _real(p["server-lr"], "server-lr", low=0.0, low_open=True)
        p["server-beta1"] = _real(p["server-beta1"], "server-beta1", low=0.0, high=1.0)
        p["server-beta2"] = _real(p["server-beta2"], "server-beta2", low=0.0, high=1.0)
        p["server-tau"] = _real(p["server-tau"], "server-tau", low=0.0, low_open=True)

    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        eta, beta_1, beta_2, tau = (float(self.params[k]) for k in
                                    ("server-lr", "server-beta1", "server-beta2", "server-tau"))
        avg = weighted_mean(updates)
        if self.m is not None and set(self.m) != set(global_arrays):
            raise ValueError("fedadam moments do not match the global model's arrays")
        # Below, every operation mirrors Flower's (python-float coefficients, numpy float64
        # eta_t), so the result is Flower's to the bit before the cast to the model's dtype.
        delta = {k: x - global_arrays[k] for k, x in avg.items()}
        m = self.m or {k: np.zeros_like(x) for k, x in avg.items()}
        v = self.v or {k: np.zeros_like(x) for k, x in avg.items()}
        self.m = {k: beta_1 * m[k] + (1 - beta_1) * delta[k] for k in delta}
        self.v = {k: beta_2 * v[k] + (1 - beta_2) * (delta[k] ** 2) for k in delta}
        self.step += 1
        eta_t = eta * np.sqrt(1 - np.power(beta_2, self.step + 1.0)) / (1 - np.power(beta_1, self.step + 1.0))
        return {k: x + eta_t * self.m[k] / (np.sqrt(self.v[k]) + tau) for k, x in global_arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        """Parameters, the step count and the moments (numpy arrays, copied).

        ``dtypes`` lets :meth:`load_state_dict` restore the moments' exact dtype even if a
        caller turned the arrays into lists on the way.
        """
        state = super().state_dict()
        state["step"] = self.step
        state["m"] = None if self.m is None else {k: a.copy() for k, a in self.m.items()}
        state["v"] = None if self.v is None else {k: a.copy() for k, a in self.v.items()}
        state["dtypes"] = None if self.m is None else {k: a.dtype.str for k, a in self.m.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])
        dtypes = state.get("dtypes") or {}
        self.m = None if state["m"] is None else {k: np.array(a, dtype=dtypes.get(k)) for k, a in state["m"].items()}
        self.v = None if state["v"] is None else {k: np.array(a, dtype=dtypes.get(k)) for k, a in state["v"].items()}


class FedMedianAggregator(Aggregator):
    """FedMedian (Yin et al. 2018): coordinate-wise median, unweighted, as Flower's ``np.median``.

    With an even number of updates the median is the mean of the two middle values.
    """

    name = "fedmedian"

    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        return {k: np.asarray(np.median(np.stack([a[k] for a, _ in updates]), axis=0)) for k in global_arrays}


class FedTrimmedAvgAggregator(Aggregator):
    """FedTrimmedAvg (Yin et al. 2018): coordinate-wise mean after cutting ``floor(beta * n)``
    values at each end, unweighted, by Flower's ``trim_mean``.

    With few sites nothing may be cut: 3 sites at beta = 0.2 cut ``floor(0.6) = 0``.

    Parameters (run config): ``trim-beta`` in [0, 0.5) (Flower's default 0.2).
    """

    name = "fedtrimmedavg"
    defaults = {"trim-beta": RunSettings.trim_beta}
    flower_names = {"beta": "trim-beta"}

    def _check_params(self) -> None:
        self.params["trim-beta"] = _real(self.params["trim-beta"], "trim-beta", low=0.0, high=0.5)

    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        beta = float(self.params["trim-beta"])
        return {k: np.asarray(trim_mean(np.stack([a[k] for a, _ in updates]), beta)) for k in global_arrays}


class KrumAggregator(Aggregator):
    """Krum (Blanchard et al. 2017): the single update closest to its neighbours, by Flower's
    ``select_multikrum``.

    Each update ``i`` scores ``sum of ||w_i - w_j||^2`` over its ``max(1, n - f - 2)`` nearest
    other updates; the lowest score wins and becomes the new global model. The Byzantine
    guarantee needs ``n > 2f + 2``; with fewer updates it still runs (as Flower does) and
    warns (once per update count). The winner's index in ``updates`` is kept in :attr:`last_selected` for the log.

    Selection runs on float64 deltas ``w_i - global``: distances are the same in exact
    arithmetic, but Flower computes them as ``|a|^2 + |b|^2 - 2 a.b``, which on raw float32
    weights cancels away the small differences between honest updates.

    Parameters (run config): ``krum-byzantine`` (f, integer >= 0; default 0).
    """

    name = "krum"
    defaults = {"krum-byzantine": RunSettings.krum_byzantine}
    flower_names = {"num_malicious_nodes": "krum-byzantine"}

    def __init__(self, **params: float | int) -> None:
        super().__init__(**params)
        self.last_selected: int | None = None
        self._warned_for: set[int] = set()  # update counts already warned about: once each, not every round

    def _check_params(self) -> None:
        f = self.params["krum-byzantine"]
        if (isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating))
                or not float(f).is_integer() or f < 0):
            raise GenofedError(f"krum-byzantine must be a whole number >= 0, got {f!r}")
        self.params["krum-byzantine"] = int(f)

    def _combine(self, global_arrays: Arrays, updates: list[tuple[Arrays, int]]) -> Arrays:
        f, n = int(self.params["krum-byzantine"]), len(updates)
        if n <= 2 * f + 2 and n not in self._warned_for:
            self._warned_for.add(n)
            log.warning("krum with %d updates and krum-byzantine = %d: Krum's guarantee needs more than %d updates",
                        n, f, 2 * f + 2)
        deltas = [({k: a[k].astype(np.float64) - global_arrays[k].astype(np.float64) for k in global_arrays}, 1)
                  for a, _ in updates]
        contents = _records(deltas)
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=1)[0]
        self.last_selected = next(i for i, c in enumerate(contents) if c is chosen)
        return {k: np.array(x, copy=True) for k, x in updates[self.last_selected][0].items()}


_CLASSES: dict[str, type[Aggregator]] = {c.name: c for c in (FedAvgAggregator, FedProxAggregator, FedAdamAggregator,
                                                              FedMedianAggregator, FedTrimmedAvgAggregator,
                                                              KrumAggregator)}
assert tuple(_CLASSES) == AGGREGATORS

#: The run-config keys each aggregator reads.
RUN_CONFIG_KEYS: dict[str, tuple[str, ...]] = {name: tuple(cls.defaults) for name, cls in _CLASSES.items()}


def _real(value: object, key: str, *, low: float, high: float | None = None, low_open: bool = False) -> float:
    """``value`` as a float in [low, high) (or (low, high)), else a :class:`GenofedError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GenofedError(f"{key} must be a number, got {value!r}")
    x = float(value)
    below = x <= low if low_open else x < low
    if not np.isfinite(x) or below or (high is not None and x >= high):
        span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g})'}"
        raise GenofedError(f"{key} must be in {span}, got {value!r}")
    return x


def make_aggregator(name: str, **params: float | int) -> Aggregator:
    """The aggregator called ``name`` with its parameters.

    Parameters
    ----------
    name : one of :data:`AGGREGATORS` (case-insensitive).
    **params : the aggregator's run-config parameters (see :data:`RUN_CONFIG_KEYS`), under
        their kebab-case names via ``**{"server-lr": 0.1}``, as ``server_lr=0.1``, or under
        Flower's keyword name for the same thing (``eta=0.1``, ``beta=0.2``,
        ``num_malicious_nodes=1``, ...; see each class's ``flower_names``).

    Raises
    ------
    GenofedError
        Unknown name (the message lists the choices), a parameter this aggregator does not
        take, or a value out of range.
    """
    key = str(name).strip().lower()
    if key not in _CLASSES:
        raise GenofedError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    cls = _CLASSES[key]
    named: dict[str, float | int] = {}
    for k, v in params.items():
        run_key = cls.flower_names.get(k, k.replace("_", "-"))
        if run_key in named:
            raise GenofedError(f"aggregator {key}: {run_key} given twice")
        named[run_key] = v
    unknown = sorted(set(named) - set(cls.defaults))
    if unknown:
        takes = ", ".join(cls.defaults) or "no parameters"
        raise GenofedError(f"aggregator {key} does not take {', '.join(unknown)}; it takes: {takes}")
    return cls(**named)


def params_from_run_config(name: str, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``run_config`` that aggregator ``name`` reads (absent keys keep defaults)."""
    key = str(name).strip().lower()
    if key not in RUN_CONFIG_KEYS:
        raise GenofedError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    return {k: run_config[k] for k in RUN_CONFIG_KEYS[key] if k in run_config}
