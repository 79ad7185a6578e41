"""Run settings: ``[tool.flwr.app.config]`` (kebab-case, as Flower apps do) as a typed object.

Every key has its default in ``pyproject.toml``; a run overrides any of them with
``flwr run . --run-config 'cnn-rounds=10 strategy="fedprox"'`` or through ``genofed simulate``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common.errors import GenofedError


class SettingsError(GenofedError):
    """A run-config value is missing or of the wrong kind."""


@dataclass(frozen=True)
class RunSettings:
    """What the coordinator runs. Field names are the run-config keys with ``_`` for ``-``."""

    run_dir: str = ""
    resume: bool = False
    seed: int = 0
    min_sites: int = 2
    wait_timeout: float = 120.0
    round_timeout: float = 600.0
    cnn_rounds: int = 5
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    trim_beta: float = 0.2
    krum_byzantine: int = 0
    max_update_norm: float = 1000.0
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    arch: str = "cnn"
    forest_trees: int = 200
    meta_rounds: int = 3
    meta_epsilon: float = 1.0        # under DP: each site's epsilon for the meta statistics over all meta rounds
    meta_c: float = 1.0
    meta_tol: float = 1e-10
    site_epsilon_budget: float = 10.0
    ledger_registry: str = ""        # coordinator file remembering each site's ledger (server/ledger_registry.py)
    sites_dir: str = ""

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> RunSettings:
        """Settings from a Flower run config (unknown keys are ignored: they belong to Flower)."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in cfg:
                continue
            default = f.default
            try:
                values[f.name] = _coerce(cfg[key], type(default))
            except (TypeError, ValueError):
                raise SettingsError(f"run config {key} = {cfg[key]!r}: expected {type(default).__name__}") from None
        return cls(**values)

    def client_config(self) -> dict[str, Any]:
        """The settings every site needs, sent with each message (kebab-case keys)."""
        keys = ("seed", "local-epochs", "dp", "epsilon", "delta", "max-grad-norm", "batch-size", "lr",
                "weight-decay", "forest-trees", "meta-c", "meta-rounds", "meta-epsilon", "site-epsilon-budget")
        as_dict = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        out = {k: as_dict[k] for k in keys}
        out["meta-C"] = out.pop("meta-c")
        out["total-rounds"] = self.cnn_rounds
        return out


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return kind(value)
