"""DP training: it learns, and the epsilon it reports is the accountant's, across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from client.dp_training import DeepData, DPConfig, TrainConfig, predict_proba, train_deep_model
from common.encoders import one_hot
from common.models import DeepModelConfig, TrackShape, build_model

ROOT = Path(__file__).resolve().parents[1]
MOTIF = np.array([0, 1, 2, 3, 3, 2])  # ACGTTG


def motif_data(n: int, seed: int, length: int = 40) -> DeepData:
    """Random DNA; class 1 carries the motif at a random position."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, size=(n, length)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    for i in np.flatnonzero(y == 1):
        pos = rng.integers(0, length - len(MOTIF))
        codes[i, pos:pos + len(MOTIF)] = MOTIF
    return DeepData(tracks=[one_hot(codes)], tabular=None, y=y)


CFG = DeepModelConfig(n_classes=2, tracks=(TrackShape("dna", 4, 40),), filters=(16, 16), kernel_sizes=(7, 3),
                      dilations=(1, 1), groups=4, head_hidden=16, dropout=0.0)


def test_non_dp_training_learns_the_motif() -> None:
    model = build_model(CFG, seed=0)
    result = train_deep_model(model, motif_data(600, 0), val=motif_data(200, 1),
                              config=TrainConfig(epochs=15, batch_size=32, lr=5e-3, patience=5))
    test = motif_data(300, 2)
    acc = float(np.mean(predict_proba(model, test).argmax(1) == test.y))
    assert acc > 0.9, acc
    assert result.epsilon is None and result.best_epoch >= 1


def _independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("n", [400, 413])
def test_dp_epsilon_matches_an_independent_accountant(n: int) -> None:
    dp = DPConfig(target_epsilon=4.0, target_delta=1e-4, max_grad_norm=1.0, total_epochs=3)
    model = build_model(CFG, seed=0)
    result = train_deep_model(model, motif_data(n, 0), config=TrainConfig(epochs=3, batch_size=40, patience=10),
                              dp=dp)
    assert result.steps > 0 and result.noise_multiplier > 0
    q = result.accountant_state["sample_rate"]
    expected = _independent_epsilon(result.noise_multiplier, q, result.steps, dp.target_delta)
    assert result.epsilon == pytest.approx(expected, rel=1e-9)
    # Calibrated to the whole training: spending all planned epochs lands on the target.
    batches = -(-n // 40)
    assert q == pytest.approx(1 / batches)
    planned = _independent_epsilon(result.noise_multiplier, q, 3 * batches, dp.target_delta)
    assert planned == pytest.approx(dp.target_epsilon, abs=0.02)
    # All planned epochs ran, so the reported spend is the target.
    assert result.epsilon == pytest.approx(dp.target_epsilon, abs=0.02)


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_dp_training import CFG, motif_data
from client.dp_training import DPConfig, TrainConfig, train_deep_model
from common.models import build_model
dp = DPConfig(target_epsilon=4.0, target_delta=1e-4, total_epochs=4)
r = train_deep_model(build_model(CFG, seed=0), motif_data(400, 0), config=TrainConfig(epochs=2, batch_size=40,
                     patience=10), dp=dp)
json.dump({{"state": r.accountant_state, "steps": r.steps, "epsilon": r.epsilon}}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_accountant_survives_a_new_process(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(out)], check=True, cwd=ROOT)
    first = json.loads(out.read_text())
    dp = DPConfig(target_epsilon=4.0, target_delta=1e-4, total_epochs=4)
    second = train_deep_model(build_model(CFG, seed=1), motif_data(400, 0),
                              config=TrainConfig(epochs=2, batch_size=40, patience=10), dp=dp,
                              accountant_state=first["state"])
    sigma, q = first["state"]["noise_multiplier"], first["state"]["sample_rate"]
    assert second.noise_multiplier == sigma  # calibrated once, reused
    total = first["steps"] + second.steps
    assert second.epsilon == pytest.approx(_independent_epsilon(sigma, q, total, 1e-4), rel=1e-9)
    assert second.epsilon > first["epsilon"]


def _private_sgd(n: int, *, sigma_epsilon: float = 2.0, max_grad_norm: float = 1.0):
    """A private SGD step set up exactly as training sets it up (our ``_make_private``), lr 1."""
    import torch

    from client.dp_training import _make_private

    data = motif_data(n, 0)
    model = build_model(CFG, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data.tensors()), batch_size=40)
    dp = DPConfig(target_epsilon=sigma_epsilon, target_delta=1e-4, max_grad_norm=max_grad_norm, total_epochs=2)
    net, opt, crit, loader, _, sigma, _ = _make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), torch.nn.CrossEntropyLoss(), loader, data,
        TrainConfig(batch_size=40), dp, None)
    return net, opt, crit, data, sigma, model


def _step(net, opt, loss_of) -> np.ndarray:
    """The change of every trained weight made by one optimizer step."""
    import torch

    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    opt.zero_grad(set_to_none=True)
    loss_of(net).backward()
    opt.step()
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    opt.zero_grad(set_to_none=True)
    return (after - before).numpy().astype(np.float64)


def test_dp_sgd_adds_the_calibrated_noise() -> None:
    """With zero gradients a DP step is pure noise: per weight N(0, (sigma * C / expected batch)^2)."""
    import torch

    net, opt, _, data, sigma, _ = _private_sgd(400)
    x = torch.as_tensor(data.tracks[0][:40], dtype=torch.float32)
    delta = _step(net, opt, lambda m: 0.0 * m(x).sum())
    expected = sigma * opt.max_grad_norm / opt.expected_batch_size
    assert sigma > 0.3 and delta.size > 1000
    # The sample sd of ~2,300 normal draws is within 6% of the true one with overwhelming probability.
    assert np.std(delta) == pytest.approx(expected, rel=0.06), (np.std(delta), expected)
    assert abs(np.mean(delta)) < 4 * expected / np.sqrt(delta.size)


def test_dp_sgd_clips_each_patients_gradient_to_the_bound() -> None:
    """One patient with an enormous loss moves the weights by at most C / expected batch (noise off)."""
    import torch

    net, opt, _, data, _, _ = _private_sgd(400, max_grad_norm=0.5)
    opt.noise_multiplier = 0.0  # isolate clipping
    x = torch.as_tensor(data.tracks[0][:1], dtype=torch.float32)
    y = torch.as_tensor(data.y[:1])
    delta = _step(net, opt, lambda m: 1e6 * torch.nn.functional.cross_entropy(m(x), y))
    bound = opt.max_grad_norm / opt.expected_batch_size
    assert np.linalg.norm(delta) <= bound * (1 + 1e-5)
    assert np.linalg.norm(delta) >= 0.99 * bound  # the huge gradient was clipped to, not below, the bound
