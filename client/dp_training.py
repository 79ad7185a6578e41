"""Training the deep model on one site, with differentially private SGD (Opacus) or without.

The DP and non-DP paths are one code path: ``dp=None`` only skips ``make_private``.

Privacy accounting spans calls. The federation trains once per round, each time in a fresh
process, so the noise multiplier is calibrated once, to the target (epsilon, delta) over the
total number of steps the whole training will take, and the accountant's state (its history of
(noise multiplier, sample rate, steps)) is returned as plain data after every call and passed
back in on the next one. The unit protected is one training record (sample-level DP) of the
site's training split; Poisson sampling, per-sample clipping and Gaussian noise as in Opacus.
Not covered: the choice of the epoch by early stopping, which looks at the validation split,
and the random number generator, which is not cryptographically secure (Opacus' secure mode
needs torchcsprng, unavailable here).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.models import GenomicNet

# Opacus' RDP accountant warns when its best order is the largest one it tries: the epsilon it
# reports is then an upper bound that more orders could tighten. Reporting a conservative epsilon
# is correct; the privacy ledger (client/privacy/ledger.py) composes with more orders.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]


@dataclass
class DeepData:
    """Model inputs for one split: track arrays (n, C, L) in config order, tabular (n, p), labels."""

    tracks: list[np.ndarray]
    tabular: np.ndarray | None
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        """Tensors in the order the training loop unpacks: tracks..., [tabular], y."""
        out = [torch.as_tensor(t, dtype=torch.float32) for t in self.tracks]
        if self.tabular is not None:
            out.append(torch.as_tensor(self.tabular, dtype=torch.float32))
        out.append(torch.as_tensor(self.y, dtype=torch.int64))
        return out


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy settings (keyword-only use, as in Opacus).

    ``total_epochs`` is the number of passes over the training split the *whole* training will
    make (in the federation: rounds x local epochs); the noise is calibrated to spend the
    target epsilon exactly at its end.

    ``grad_sample_mode`` defaults to Opacus' expanded weights ("ew"), the fastest correct mode
    on our network (``python -m simulations.benchmarks.dp_modes``: see docs/learning.md).
    """

    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    total_epochs: int = 10
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    grad_sample_mode: GradSampleMode = "ew"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    ``select_best`` keeps the weights of the epoch with the lowest validation loss and stops
    after ``patience`` epochs without improvement (pooled training). Federated local training
    turns it off: a round returns the weights after exactly ``epochs`` epochs.
    """

    epochs: int = 10
    batch_size: int = 64
    max_physical_batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 3
    seed: int = 0
    reverse_complement_track: int | None = None
    select_best: bool = True


@dataclass
class TrainResult:
    """What a training call returns: the best weights, privacy spent, and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]]
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant_state: dict[str, Any] | None = None
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def calibrate_noise(*, n_train: int, dp: DPConfig, batch_size: int) -> tuple[float, float]:
    """Noise multiplier reaching ``dp.target_epsilon`` after ``dp.total_epochs``; returns (sigma, q)."""
    from opacus.accountants.utils import get_noise_multiplier

    # Opacus' Poisson loader samples each record with rate 1 / (batches per epoch) and draws
    # that many batches per epoch; calibrating with anything else would miss the target.
    batches = math.ceil(n_train / batch_size)
    q = 1.0 / batches
    steps = dp.total_epochs * batches
    sigma = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.target_delta, sample_rate=q,
                                 steps=steps, accountant=dp.accountant)
    return float(sigma), q


def epsilon_of(accountant_state: dict[str, Any], *, delta: float) -> float:
    """Epsilon spent according to an accountant state (independent of any training objects)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant_state["mechanism"])
    acc.load_state_dict(_accountant_from_json(accountant_state))
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def _accountant_to_json(state: dict[str, Any], sigma: float, q: float) -> dict[str, Any]:
    return {"mechanism": state["mechanism"], "history": [list(map(float, h[:2])) + [int(h[2])] for h in state["history"]],
            "noise_multiplier": sigma, "sample_rate": q}


def _accountant_from_json(state: dict[str, Any]) -> dict[str, Any]:
    return {"mechanism": state["mechanism"], "history": [(float(a), float(b), int(c)) for a, b, c in state["history"]]}


def _rc_augment(batch: list[torch.Tensor], track: int | None, gen: torch.Generator) -> list[torch.Tensor]:
    """Reverse-complement half the DNA sequences of a batch (one-hot ACGT: flip channels and positions)."""
    if track is None:
        return batch
    x = batch[track]
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = torch.flip(x[flip], dims=(1, 2))
    return [*batch[:track], x, *batch[track + 1:]]


def _split_batch(batch: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model inputs (tracks then tabular, as ``GenomicNet.forward`` takes them) and labels."""
    return list(batch[:-1]), batch[-1]


@torch.no_grad()
def predict_proba(model: GenomicNet, data: DeepData, *, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (n, K) of ``model`` on ``data``."""
    model.eval()
    loader = DataLoader(TensorDataset(*data.tensors()), batch_size=batch_size, shuffle=False)
    out = []
    for batch in loader:
        inputs, _ = _split_batch(list(batch))
        out.append(torch.softmax(model(*inputs), dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.n_classes))


def _val_loss(model: nn.Module, data: DeepData) -> float:
    p = predict_proba(model, data)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(data)), data.y], 1e-12, 1.0))))


def train_deep_model(model: GenomicNet, train: DeepData, *, val: DeepData | None = None, config: TrainConfig,
                     dp: DPConfig | None = None, accountant_state: dict[str, Any] | None = None,
                     proximal_mu: float = 0.0, on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` in place for up to ``config.epochs`` epochs; returns the best weights.

    Parameters
    ----------
    accountant_state : the state returned by the previous call (``None`` on the first call).
        Its noise multiplier is reused so that the calibration to the whole training holds.
    proximal_mu : FedProx weight (0 for plain training): pulls weights towards their starting point.
    on_epoch : called with each epoch's record (for progress display).
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dataset = TensorDataset(*train.tensors())
    loader = DataLoader(dataset, batch_size=min(config.batch_size, len(train)), shuffle=True, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss()
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu else None
    sigma = q = None
    engine = None
    net: nn.Module = model
    if dp is not None:
        net, optimizer, criterion, loader, engine, sigma, q = _make_private(model, optimizer, criterion, loader,
                                                                            train, config, dp, accountant_state)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    bad_epochs = steps = 0
    for epoch in range(1, config.epochs + 1):
        loss_sum, seen, steps_epoch = _run_epoch(net, optimizer, criterion, loader, config, dp, gen, start,
                                                 proximal_mu)
        steps += steps_epoch
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1)}
        if val is not None and len(val):
            record["val_loss"] = _val_loss(model, val)
        if engine is not None:
            record["epsilon"] = float(engine.accountant.get_epsilon(delta=dp.target_delta))
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if not config.select_best:
            continue
        score = record.get("val_loss", record["train_loss"])
        if score < best[0] - 1e-6:
            best, bad_epochs = (score, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
    if config.select_best:
        model.load_state_dict(best[2])
        weights, best_epoch = best[2], best[1]
    else:
        weights, best_epoch = copy.deepcopy(model.state_dict()), len(history)
    result = TrainResult(state_dict=weights, epochs_run=len(history), best_epoch=best_epoch, history=history,
                         steps=steps)
    if engine is not None:
        result.accountant_state = _accountant_to_json(engine.accountant.state_dict(), sigma, q)
        result.epsilon = epsilon_of(result.accountant_state, delta=dp.target_delta)
        result.delta, result.noise_multiplier = dp.target_delta, sigma
    return result


def _make_private(model, optimizer, criterion, loader, train, config, dp, accountant_state):
    from opacus import PrivacyEngine

    if accountant_state:
        sigma, q = float(accountant_state["noise_multiplier"]), float(accountant_state["sample_rate"])
    else:
        sigma, q = calibrate_noise(n_train=len(train), dp=dp, batch_size=config.batch_size)
    with warnings.catch_warnings():
        # Opacus warns about the insecure RNG on every call; the module docstring states it once.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=dp.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(_accountant_from_json(accountant_state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapped = engine.make_private(module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                                      noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
                                      grad_sample_mode=dp.grad_sample_mode)
    if dp.grad_sample_mode == "ghost":
        net, optimizer, criterion, loader = wrapped
    else:
        net, optimizer, loader = wrapped
    return net, optimizer, criterion, loader, engine, sigma, q


def _run_epoch(net, optimizer, criterion, loader, config, dp, gen, start, mu):
    net.train()
    loss_sum, seen, steps = 0.0, 0, 0
    if dp is not None:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=config.max_physical_batch_size,
                                 optimizer=optimizer)
    else:
        ctx = _NullContext(loader)
    with ctx as batches:
        for batch in batches:
            batch = _rc_augment(list(batch), config.reverse_complement_track, gen)
            inputs, y = _split_batch(batch)
            if y.shape[0] == 0:
                continue  # Poisson sampling can draw an empty batch
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(*inputs), y)
            loss.backward()
            optimizer.step()
            if dp is None or not getattr(optimizer, "_is_last_step_skipped", False):
                steps += 1
                if mu and start is not None:
                    _proximal_step(net, start, mu * config.lr)
            loss_sum += float(loss.detach()) * y.shape[0]
            seen += y.shape[0]
    optimizer.zero_grad(set_to_none=True)  # "ew" mode needs this before the next forward
    return loss_sum, seen, steps


@torch.no_grad()
def _proximal_step(net: nn.Module, start: list[torch.Tensor], rate: float) -> None:
    """FedProx pull towards the round's starting weights.

    Applied as its own step rather than as a loss term: under Opacus a loss term that is not a
    per-sample sum would be missed by the per-sample gradient hooks. It reads no data, so it
    costs no privacy.
    """
    params = net._module.parameters() if hasattr(net, "_module") else net.parameters()
    for p, s in zip(params, start):
        p.sub_(rate * (p - s))


class _NullContext:
    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __enter__(self) -> DataLoader:
        return self.loader

    def __exit__(self, *exc: object) -> None:
        return None
