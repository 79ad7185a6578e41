"""The deep model: 1D convolutional towers over genomic tracks, an optional dense branch, one logit per class.

Every site and the coordinator build the same network from the same :class:`DeepModelConfig`,
so the federation only ever exchanges its ``state_dict``. Design constraints:

- GroupNorm, never BatchNorm: Opacus computes per-sample gradients, and batch statistics would
  mix samples (and leak across them).
- Global pooling (max and mean) after the convolutions, so the head does not depend on L.
- One tower per track (DNA one-hot, genotype dosages): tracks have different lengths.
- ``arch = "lstm"`` swaps each convolutional tower for an Opacus ``DPLSTM`` over the track; the
  rest of the network is the same. A cohort with no track at all gets the dense branch alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class TrackShape:
    """One input track: its name, channel count and length.

    ``positional`` says whether position along the track carries meaning: True for genotype
    dosages (position = which variant), None to decide by length (short aligned sequences are
    positional, long ones are read for content only).
    """

    name: str
    channels: int
    length: int
    positional: bool | None = None


@dataclass(frozen=True)
class DeepModelConfig:
    """Architecture of the deep model; plain data, so it travels in run config and checkpoints."""

    n_classes: int
    tracks: tuple[TrackShape, ...] = ()
    n_tabular: int = 0
    arch: Literal["cnn", "lstm"] = "cnn"
    filters: tuple[int, ...] = (64, 64)
    kernel_sizes: tuple[int, ...] = (9, 5)
    dilations: tuple[int, ...] = (1, 1)
    pool: int = 2
    positional_max_length: int = 100
    positional_bins: int = 64
    # GroupNorm groups in each conv layer; None: one group per channel (each filter normalized alone).
    # Per channel, FedAvg without DP learned more of the synthetic cohort, but pooled training and the
    # DP demo's pretrained model lost: docs/learning.md, "One GroupNorm group per channel".
    groups: int | None = 8
    lstm_hidden: int = 32
    dense_hidden: int = 64
    head_hidden: int = 32
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tracks and self.n_tabular == 0:
            raise ValueError("the deep model needs at least one track or tabular input")
        if not len(self.filters) == len(self.kernel_sizes) == len(self.dilations):
            raise ValueError("filters, kernel_sizes and dilations must have the same length")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"groups must be at least 1 (or None: one per channel), got {self.groups}")
        for f in self.filters:
            if self.groups is not None and f % self.groups:
                raise ValueError(f"filters ({f}) must be a multiple of groups ({self.groups}) for GroupNorm")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = dataclasses.asdict(self)
        d["tracks"] = [dataclasses.asdict(t) for t in self.tracks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepModelConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["tracks"] = tuple(TrackShape(**t) for t in d.get("tracks", ()))
        for key in ("filters", "kernel_sizes", "dilations"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class ConvTower(nn.Module):
    """Conv1d -> GroupNorm -> ReLU -> MaxPool blocks, then a read-out that keeps or drops position.

    Content read-out (long DNA): global max and mean pooling, so a motif counts wherever it is.
    Positional read-out (short aligned DNA, e.g. splice sites; genotype dosages, where position
    is the variant): the feature maps are flattened, after max pooling to at most
    ``positional_bins`` positions so a long panel does not make the head huge.
    """

    def __init__(self, track: TrackShape, cfg: DeepModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = track.channels
        for i, (f, k, d) in enumerate(zip(cfg.filters, cfg.kernel_sizes, cfg.dilations)):
            layers += [nn.Conv1d(c_in, f, k, dilation=d, padding=d * (k - 1) // 2),
                       nn.GroupNorm(cfg.groups or f, f), nn.ReLU()]
            if cfg.pool > 1 and i < len(cfg.filters) - 1:
                layers.append(nn.MaxPool1d(cfg.pool, ceil_mode=True))
            c_in = f
        self.body = nn.Sequential(*layers)
        self.positional = track.positional if track.positional is not None else \
            track.length <= cfg.positional_max_length
        self.readout: nn.Module = nn.Identity()
        if self.positional:
            with torch.no_grad():
                out_len = int(self.body(torch.zeros(1, track.channels, track.length)).shape[2])
            if out_len > cfg.positional_bins:
                self.readout = nn.AdaptiveMaxPool1d(cfg.positional_bins)
                out_len = cfg.positional_bins
            self.out_features = c_in * out_len
        else:
            self.out_features = 2 * c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.positional:
            return self.readout(h).flatten(start_dim=1)
        return torch.cat([h.amax(dim=2), h.mean(dim=2)], dim=1)


class LSTMTower(nn.Module):
    """A DP-compatible LSTM over the track's positions; last and mean hidden states."""

    def __init__(self, track: TrackShape, cfg: DeepModelConfig) -> None:
        super().__init__()
        from opacus.layers import DPLSTM

        self.lstm = DPLSTM(track.channels, cfg.lstm_hidden, batch_first=True)
        self.out_features = 2 * cfg.lstm_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x.transpose(1, 2))
        return torch.cat([h[:, -1, :], h.mean(dim=1)], dim=1)


class GenomicNet(nn.Module):
    """Towers over tracks plus a dense branch over tabular inputs, joined by a small head.

    ``forward(*inputs)`` takes the (n, C_t, L_t) track tensors in config order, then the
    (n, n_tabular) tabular tensor when the model has a dense branch; it returns (n, n_classes)
    logits. Inputs are positional tensors (not a list) because Opacus' expanded-weights mode
    reads the batch size from the first one.
    """

    def __init__(self, cfg: DeepModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        tower = LSTMTower if cfg.arch == "lstm" else ConvTower
        self.towers = nn.ModuleList(tower(t, cfg) for t in cfg.tracks)
        width = sum(t.out_features for t in self.towers)
        self.dense: nn.Module | None = None
        if cfg.n_tabular:
            self.dense = nn.Sequential(nn.Linear(cfg.n_tabular, cfg.dense_hidden), nn.ReLU(),
                                       nn.Dropout(cfg.dropout))
            width += cfg.dense_hidden
        self.head = nn.Sequential(nn.Linear(width, cfg.head_hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.out = nn.Linear(cfg.head_hidden, cfg.n_classes)

    @property
    def n_inputs(self) -> int:
        """How many tensors ``forward`` takes."""
        return len(self.towers) + (1 if self.dense is not None else 0)

    def embed(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (what the forest can be fed as extra features)."""
        if len(inputs) != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} input tensors ({len(self.towers)} tracks"
                             f"{' + tabular' if self.dense is not None else ''}), got {len(inputs)}")
        parts = [tower(x) for tower, x in zip(self.towers, inputs)]
        if self.dense is not None:
            parts.append(self.dense(inputs[-1]))
        return self.head(torch.cat(parts, dim=1))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(*inputs))


def build_model(cfg: DeepModelConfig, *, seed: int | None = None) -> GenomicNet:
    """The network for ``cfg``; with a seed, the initial weights are reproducible."""
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return GenomicNet(cfg)
        finally:
            torch.random.set_rng_state(gen_state)
    return GenomicNet(cfg)
