"""Models fitted or received on site, kept in the site's vault (they encode patient data).

Roles
-----
``model/forest``            the site forest (and its tabular preprocessor), pickled
``model/cnn``               the final global deep model: weights (.npz) + its config (JSON inside)
``model/meta``              the final meta-classifier coefficients (JSON)
``model/explanation``       the run's global explanation as the coordinator sent it (JSON, public labels)
``run/<run-id>/...``        per-run working state (DP-SGD accountant, the last release of each kind)

The forest is stored with ``pickle``: loading it is safe only because every blob a vault returns
has been authenticated with the site's key, so it can only be a blob this site wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.vault import Vault

LOCAL_MODELS_ROLE = "model/local"
CNN_ROLE = "model/cnn"
SHARED_ROLE = "model/shared-scaler"
META_ROLE = "model/meta"
EXPLANATION_ROLE = "model/explanation"


def run_role(run_id: str, name: str) -> str:
    """A per-run working role (the run id is a Flower run id or a simulation id: digits/letters)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(run_id))
    return f"run/{safe}/{name}"


def put_json(vault: Vault, role: str, obj: Any) -> None:
    vault.update({role: json.dumps(obj, sort_keys=True).encode("utf-8")})


def get_json(vault: Vault, role: str, default: Any = None) -> Any:
    return json.loads(vault.read(role).decode("utf-8")) if role in vault.roles else default


def arrays_to_bytes(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.asarray(json.dumps(meta or {})), **arrays)
    return buf.getvalue()


def arrays_from_bytes(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else {}
    return arrays, meta


def save_local_models(vault: Vault, *, run_id: str, **models: Any) -> None:
    """The site's own models of one run, fitted on its train split (the forest with its
    preprocessor, the site's GLM with its scaler): they never leave the site."""
    vault.update({LOCAL_MODELS_ROLE: pickle.dumps({**models, "run_id": run_id})})


def load_local_models(vault: Vault) -> dict[str, Any] | None:
    if LOCAL_MODELS_ROLE not in vault.roles:
        return None
    return pickle.loads(vault.read(LOCAL_MODELS_ROLE))  # noqa: S301 - authenticated blob written by this site


def save_alone_models(vault: Vault, models: dict[str, Any], *, run_id: str) -> None:
    """The site's own models of one run (trained on its data alone; they never leave)."""
    vault.update({run_role(run_id, "alone-models"): pickle.dumps(models)})


def load_alone_models(vault: Vault, *, run_id: str) -> dict[str, Any] | None:
    role = run_role(run_id, "alone-models")
    if role not in vault.roles:
        return None
    return pickle.loads(vault.read(role))  # noqa: S301 - authenticated blob written by this site


def save_start_weights(vault: Vault, weights: dict[str, np.ndarray], *, run_id: str) -> None:
    """The deep model's weights at the start of a run (round 1's global model), once: the site's
    own model alone starts from the same point, so a warm start helps both sides of the comparison."""
    role = run_role(run_id, "start-weights")
    if role not in vault.roles:
        vault.update({role: arrays_to_bytes(weights)})


def load_start_weights(vault: Vault, *, run_id: str) -> dict[str, np.ndarray] | None:
    role = run_role(run_id, "start-weights")
    return arrays_from_bytes(vault.read(role))[0] if role in vault.roles else None


def save_final_models(vault: Vault, *, cnn: dict[str, np.ndarray], cnn_config: dict[str, Any],
                      shared: dict[str, np.ndarray], meta: dict[str, Any], run_id: str,
                      explanation: dict[str, Any] | None = None) -> None:
    """The global models a run ends with (deep model, shared scaler, GLM and meta-classifier
    coefficients) and its global explanation, written together in one atomic vault update."""
    blobs = {CNN_ROLE: arrays_to_bytes(cnn, {"config": cnn_config, "run_id": run_id}),
             SHARED_ROLE: arrays_to_bytes(shared, {"run_id": run_id}),
             META_ROLE: json.dumps({**meta, "run_id": run_id}, sort_keys=True).encode("utf-8")}
    if explanation is not None:
        blobs[EXPLANATION_ROLE] = json.dumps(explanation, sort_keys=True).encode("utf-8")
    vault.update(blobs)


def request_digest(settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """A digest of everything a release is computed from, besides the site's data and key."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def release_blob(arrays: dict[str, np.ndarray], values: dict[str, Any], *, request: str,
                 charges: Sequence[int] = ()) -> bytes:
    """A release as sent (arrays plus scalar values), tagged with the request it answered and the
    ledger charges (sequence numbers) that paid for it."""
    return arrays_to_bytes(arrays, {"request": request, "values": values, "charges": [int(c) for c in charges]})


def read_release(vault: Vault, role: str, *,
                 request: str) -> tuple[dict[str, np.ndarray], dict[str, Any], list[int]] | None:
    """The release stored under ``role`` if it answered exactly ``request`` (arrays, values and the
    charges that paid for it), else None."""
    if role not in vault.roles:
        return None
    arrays, meta = arrays_from_bytes(vault.read(role))
    return (arrays, meta["values"], list(meta.get("charges", []))) if meta.get("request") == request else None


def save_explanation(vault: Vault, explanation: dict[str, Any]) -> None:
    """The global explanation a run sent (``explanation.json``'s content), kept with the final models."""
    put_json(vault, EXPLANATION_ROLE, explanation)


def load_explanation(vault: Vault) -> dict[str, Any] | None:
    """The stored global explanation, or None when no run has sent one."""
    return get_json(vault, EXPLANATION_ROLE)
