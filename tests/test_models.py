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


def _inputs(cfg: DeepModelConfig, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.rand(n, t.channels, t.length, generator=g) for t in cfg.tracks]
    if cfg.n_tabular:
        inputs.append(torch.randn(n, cfg.n_tabular, generator=g))
    return inputs


CONFIGS = {
    "cnn-dna": DeepModelConfig(n_classes=3, tracks=(DNA,), filters=(16, 16), kernel_sizes=(9, 5), dilations=(1, 2),
                               groups=4),
    "cnn-dna-pooled": DeepModelConfig(n_classes=2, tracks=(DNA,), positional_max_length=10, groups=4),
    "cnn-dna-per-channel-norm": DeepModelConfig(n_classes=2, tracks=(DNA,), filters=(8, 12), kernel_sizes=(5, 3),
                                                dilations=(1, 1), groups=None),
    "cnn-two-tracks-dense": DeepModelConfig(n_classes=2, tracks=(DNA, DOSAGE), n_tabular=5, filters=(8, 16),
                                            kernel_sizes=(7, 3), dilations=(1, 1), groups=4),
    "dosage-binned": DeepModelConfig(n_classes=2, tracks=(TrackShape("dosage", 2, 300, positional=True),),
                                     positional_bins=16, filters=(8,), kernel_sizes=(5,), dilations=(1,), groups=4),
    "dense-only": DeepModelConfig(n_classes=2, n_tabular=7),
    "lstm": DeepModelConfig(n_classes=2, tracks=(TrackShape("dna", 4, 20),), arch="lstm", lstm_hidden=8,
                            filters=(8,), kernel_sizes=(3,), dilations=(1,), groups=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_opacus_validation(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    inputs = _inputs(cfg, 5)
    assert model(*inputs).shape == (5, cfg.n_classes)
    assert model.embed(*inputs).shape == (5, cfg.head_hidden)
    with pytest.raises(ValueError, match="input tensors"):
        model(*inputs[:-1])


def test_seeded_build_is_deterministic_and_config_round_trips() -> None:
    cfg = CONFIGS["cnn-two-tracks-dense"]
    a, b = build_model(cfg, seed=7), build_model(DeepModelConfig.from_dict(cfg.to_dict()), seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(next(build_model(cfg, seed=8).parameters()), next(a.parameters()))


def test_long_positional_track_is_binned() -> None:
    model = build_model(CONFIGS["dosage-binned"], seed=0)
    assert model.towers[0].positional and model.towers[0].out_features == 8 * 16
    pooled = build_model(CONFIGS["cnn-dna-pooled"], seed=0)
    assert not pooled.towers[0].positional


def test_groups_none_normalizes_each_filter_alone() -> None:
    cfg = CONFIGS["cnn-dna-per-channel-norm"]
    norms = [m for m in build_model(cfg, seed=0).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(8, 8), (12, 12)]
    assert DeepModelConfig.from_dict(cfg.to_dict()).groups is None
    with pytest.raises(ValueError, match="groups must be at least 1"):
        DeepModelConfig(n_classes=2, tracks=(DNA,), groups=0)


def test_config_rejects_groupnorm_mismatch_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="multiple of groups"):
        DeepModelConfig(n_classes=2, tracks=(DNA,), filters=(10,), kernel_sizes=(3,), dilations=(1,), groups=4)
    with pytest.raises(ValueError, match="at least one track or tabular"):
        DeepModelConfig(n_classes=2)


# DPLSTM carries its own per-sample gradient hooks, so it is checked in the hooks mode only.
# "ghost" clipping never materialises per-sample gradients (only their norms): nothing to compare.
@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in CONFIGS for m in ("hooks", "functorch", "ew")
                                            if not (n == "lstm" and m != "hooks")])
def test_per_sample_gradients_match_per_sample_backward(name: str, mode: str) -> None:
    """Opacus' per-sample gradients on our model equal one backward pass per sample."""
    # Dropout off, training mode on: Opacus records activations only in training mode.
    cfg = dataclasses.replace(CONFIGS[name], dropout=0.0)
    model = build_model(cfg, seed=1)
    inputs = _inputs(cfg, 6, seed=3)
    y = torch.arange(6) % cfg.n_classes
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    expected = []
    for i in range(6):
        model.zero_grad()
        loss_fn(model(*[x[i:i + 1] for x in inputs]), y[i:i + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    gsm = prepare_module(model, mode, loss_reduction="sum")
    gsm.zero_grad()
    loss_fn(gsm(*inputs), y).backward()
    for n, p in model.named_parameters():
        for i in range(6):
            torch.testing.assert_close(p.grad_sample[i], expected[i][n], atol=1e-5, rtol=1e-4)
