"""The deep model: shapes, determinism, Opacus compatibility and per-sample gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.validators import ModuleValidator

from common.models import DeepModelConfig, TrackShape, build_model

DNA = TrackShape("dna", 4, 60)
DOSAGE = TrackShape("dosage", 2, 33)


def _inputs(cfg: DeepModelConfig, n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    tracks = [torch.rand(n, t.channels, t.length, generator=g) for t in cfg.tracks]
    tab = torch.randn(n, cfg.n_tabular, generator=g) if cfg.n_tabular else None
    return tracks, tab


CONFIGS = {
    "cnn-dna": DeepModelConfig(n_classes=3, tracks=(DNA,), filters=(16, 16), groups=4),
    "cnn-two-tracks-dense": DeepModelConfig(n_classes=2, tracks=(DNA, DOSAGE), n_tabular=5, filters=(8, 16), groups=4),
    "dense-only": DeepModelConfig(n_classes=2, n_tabular=7),
    "lstm": DeepModelConfig(n_classes=2, tracks=(TrackShape("dna", 4, 20),), arch="lstm", lstm_hidden=8,
                            filters=(8,), kernel_sizes=(3,), dilations=(1,), groups=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_opacus_validation(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    tracks, tab = _inputs(cfg, 5)
    assert model(tracks, tab).shape == (5, cfg.n_classes)
    assert model.embed(tracks, tab).shape == (5, cfg.head_hidden)


def test_seeded_build_is_deterministic_and_config_round_trips() -> None:
    cfg = CONFIGS["cnn-two-tracks-dense"]
    a, b = build_model(cfg, seed=7), build_model(DeepModelConfig.from_dict(cfg.to_dict()), seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(next(build_model(cfg, seed=8).parameters()), next(a.parameters()))


def test_config_rejects_groupnorm_mismatch_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="multiple of groups"):
        DeepModelConfig(n_classes=2, tracks=(DNA,), filters=(10,), kernel_sizes=(3,), dilations=(1,), groups=4)
    with pytest.raises(ValueError, match="at least one track or tabular"):
        DeepModelConfig(n_classes=2)


# DPLSTM carries its own per-sample gradient hooks, so it is checked in the hooks mode only.
@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in CONFIGS for m in ("hooks", "functorch")
                                            if not (n == "lstm" and m == "functorch")])
def test_per_sample_gradients_match_per_sample_backward(name: str, mode: str) -> None:
    """Opacus' per-sample gradients on our model equal one backward pass per sample."""
    # Dropout off, training mode on: Opacus records activations only in training mode.
    cfg = dataclasses.replace(CONFIGS[name], dropout=0.0)
    model = build_model(cfg, seed=1)
    tracks, tab = _inputs(cfg, 6, seed=3)
    y = torch.arange(6) % cfg.n_classes
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    expected = []
    for i in range(6):
        model.zero_grad()
        loss_fn(model([t[i:i + 1] for t in tracks], None if tab is None else tab[i:i + 1]), y[i:i + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    gsm = prepare_module(model, mode, loss_reduction="sum")
    gsm.zero_grad()
    loss_fn(gsm(tracks, tab), y).backward()
    for n, p in model.named_parameters():
        for i in range(6):
            torch.testing.assert_close(p.grad_sample[i], expected[i][n], atol=1e-5, rtol=1e-4)
