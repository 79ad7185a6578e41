"""Warm start (the seed's transfer learning): the deep model begins from an earlier global model.

``init-from`` names an earlier run directory (its latest checkpoint) or one checkpoint file. The
earlier model must have the very layout this run derives from the agreed schema: the checkpoint's
recorded model configuration and every array's name and shape are checked, and a mismatch stops the
run at the census with one line naming the file and the first difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import GenofedError


class WarmStartError(GenofedError):
    """``init-from`` cannot be used for this run."""


def load_initial_weights(path: str, *, model_config: dict[str, Any],
                         expected: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The deep model's weights from ``path`` (a run directory or a checkpoint ``.npz``), schema checked,
    and where they came from (``genofed pretrain`` records it; a run's own checkpoint has none: ``{}``).

    Raises
    ------
    WarmStartError
        Missing or unreadable, not a checkpoint of a deep model, or of another layout.
    """
    from server.checkpoint import CorruptCheckpoint, load_checkpoint, load_latest

    where = Path(path)
    try:
        ckpt = load_latest(where) if where.is_dir() else load_checkpoint(where)
    except (OSError, CorruptCheckpoint, ValueError) as exc:
        raise WarmStartError(f"init-from {where}: cannot read a checkpoint there ({exc})") from None
    if ckpt is None:
        raise WarmStartError(f"init-from {where}: no checkpoint in that run directory")
    earlier = ckpt.state.get("model_config")
    if earlier is not None and json.dumps(earlier, sort_keys=True) != json.dumps(model_config, sort_keys=True):
        diff = sorted(k for k in set(earlier) | set(model_config) if earlier.get(k) != model_config.get(k))
        raise WarmStartError(f"init-from {ckpt.path}: its deep model has another layout than this run's "
                             f"(differs in {', '.join(diff)}); warm start needs the same cohort schema and arch")
    if set(ckpt.arrays) != set(expected):
        missing = sorted(set(expected) - set(ckpt.arrays))[:3]
        raise WarmStartError(f"init-from {ckpt.path}: not this run's deep model (missing {missing or 'nothing'}, "
                             f"{len(set(ckpt.arrays) - set(expected))} unknown arrays)")
    for name, ref in expected.items():
        got = ckpt.arrays[name]
        if got.shape != ref.shape or not np.issubdtype(got.dtype, np.floating) and got.dtype != ref.dtype:
            raise WarmStartError(f"init-from {ckpt.path}: array {name} has shape {got.shape}, this run's model "
                                 f"needs {ref.shape}")
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise WarmStartError(f"init-from {ckpt.path}: array {name} holds non-finite values")
    origin = ckpt.state.get("origin")
    return ({name: np.asarray(ckpt.arrays[name], dtype=expected[name].dtype) for name in expected},
            dict(origin) if isinstance(origin, dict) else {})
