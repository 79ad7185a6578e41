"""Benchmark: training samples per second of genofed's deep model against the same network in a
plain PyTorch loop, and the achieved arithmetic rate against this machine's matmul rate.

Both train the default deep model (:func:`common.models.build_model`) without DP on the same
synthetic 1,000 bp one-hot records, with Adam and the same batch size, for one epoch after a
warm-up epoch: genofed through :func:`client.dp_training.train_deep_model` (its loader, loss and
bookkeeping), the baseline through the shortest loop PyTorch allows. The model's floating-point
operations per training sample (forward and backward) come from ``torch.utils.flop_counter``;
the machine's rate from float32 2048 x 2048 matrix products, timed in the same run.

Usage::

    python -m simulations.benchmarks.throughput [--patients 2048] [--length 1000] [--batch 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from simulations.benchmarks import emit, run_main


def _data(patients: int, length: int) -> Any:
    import numpy as np

    from client.dp_training import DeepData
    from common.encoders import one_hot

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(patients, length)).astype(np.uint8)
    return DeepData(tracks=[one_hot(codes)], tabular=None, y=rng.integers(0, 2, patients))


def _model(length: int) -> Any:
    from common.models import DeepModelConfig, TrackShape, build_model

    return build_model(DeepModelConfig(n_classes=2, tracks=(TrackShape("dna", 4, length),)), seed=0)


def flops_per_sample(length: int, batch: int) -> float:
    """Forward + backward floating-point operations of one training sample of the default model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(length)
    x = torch.zeros(batch, 4, length)
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
        loss.backward()
    return counter.get_total_flops() / batch


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate (GFLOP/s, best of ``repeats``)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def plain_pytorch(data: Any, length: int, batch: int) -> float:
    """Samples/s of the shortest PyTorch training loop (one timed epoch after a warm-up one)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(length)
    x, y = data.tensors()[0], data.tensors()[-1]
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    seconds = 0.0
    for epoch in range(2):
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        seconds = time.perf_counter() - t0
    return len(y) / seconds


def genofed_loop(data: Any, length: int, batch: int) -> float:
    """Samples/s of :func:`client.dp_training.train_deep_model` (the second of two epochs)."""
    from client.dp_training import TrainConfig, train_deep_model

    times: list[float] = []
    last = [time.perf_counter()]

    def on_epoch(_: dict[str, float]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_deep_model(_model(length), data, config=TrainConfig(epochs=2, batch_size=batch, patience=3,
                                                             select_best=False), on_epoch=on_epoch)
    return len(data.y) / times[-1]


def run(*, patients: int, length: int, batch: int) -> dict[str, Any]:
    """Both loops and the matmul rate, one after the other."""
    data = _data(patients, length)
    flops = flops_per_sample(length, batch)
    peak = matmul_gflops()
    out: dict[str, Any] = {"patients": patients, "length": length, "batch": batch,
                           "flops_per_sample": flops, "matmul_gflops": peak}
    for name, loop in (("plain-pytorch", plain_pytorch), ("genofed", genofed_loop)):
        rate = loop(data, length, batch)
        out[name] = {"samples_per_s": rate, "gflops": rate * flops / 1e9, "of_matmul_peak": rate * flops / 1e9 / peak}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2048)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    emit(run(patients=args.patients, length=args.length, batch=args.batch), args.json)


if __name__ == "__main__":
    run_main(main, "python -m simulations.benchmarks.throughput")
