"""A site's part in the secure sum (common/secure_sum.py): keys, shares, masked replies, unmasking.

``query.secure_keys`` (once per run) makes the site's two key pairs for the run and returns the
public keys; ``query.secure_shares`` (once per run) takes the coordinator's roster, keeps it, and
returns the shares of the site's mask key sealed for each other site; every additive reply of a
secure exchange is masked by :func:`mask_reply` after its egress contract is checked;
``query.secure_unmask`` returns the site's shares for one release.

What the site keeps in its vault (``run/<run id>/secure-*``): its private keys, the roster, and
every unmask request it answered. It never answers two different unmask requests for one
release, never reveals a self mask of a site whose mask key it revealed (in any release), and
never masks with such a site again: the coordinator cannot hold both halves of one site's mask.
"""

from __future__ import annotations

import json
from typing import Any


from client.handlers import HandlerReply, _load, _privacy
from client.privacy.egress import contract_for
from client.site import SiteRef
from common.secure_sum import (
    MASK_KEY,
    SELF_MASK,
    Roster,
    SecureSumError,
    SiteKeys,
    encode,
    mask,
    reveal,
    share_mask_key,
)
from common.settings import RoundFacts, RunSettings
from common.summands import flatten, layout, plain_metrics, summands, summed_record

KEYS, ROSTER, REVEALED = "secure-keys", "secure-roster", "secure-revealed"


def _role(run_id: str, name: str) -> str:
    from client.model_store import run_role

    return run_role(run_id, name)


def _keys(vault: Any, run_id: str) -> SiteKeys:
    role = _role(run_id, KEYS)
    if role not in vault.roles:
        raise SecureSumError(f"secure sum: this site has no keys for run {run_id} (the coordinator skipped "
                             "query.secure_keys)")
    return SiteKeys.from_bytes(vault.read(role))


def _roster(vault: Any, run_id: str, digest: str = "") -> Roster:
    from client.model_store import get_json

    stored = get_json(vault, _role(run_id, ROSTER))
    if stored is None:
        raise SecureSumError(f"secure sum: this site holds no roster for run {run_id}")
    roster = Roster.from_dict(stored)
    if digest and digest != roster.digest():
        raise SecureSumError("secure sum: the release names another roster than the one this site shared its key for")
    return roster


def secure_keys(site: SiteRef, settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Make (or, asked again, reuse) the site's key pairs for this run; return the public keys."""
    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    role = _role(facts.run_id, KEYS)
    if role in vault.roles:
        keys = SiteKeys.from_bytes(vault.read(role))
    else:
        keys = SiteKeys.generate()
        vault.update({role: keys.to_bytes()})
    cipher, mask_key = keys.public()
    return HandlerReply({"keys": ("config", {"cipher": cipher.decode(), "mask": mask_key.decode()})},
                        contract_for("query.secure_keys", dp=settings.dp, n_classes=len(cohort.classes)), privacy)


def secure_shares(site: SiteRef, settings: RunSettings, facts: RoundFacts) -> HandlerReply:
    """Keep the coordinator's roster and return the mask key's shares sealed for the other sites.

    Raises
    ------
    SecureSumError
        The roster does not hold this site's keys, or its threshold is not more than half.
    """
    from client.model_store import get_json, put_json

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    roster = Roster.from_dict(json.loads(facts.secure)["roster"])
    stored = get_json(vault, _role(facts.run_id, ROSTER))
    if stored is not None and Roster.from_dict(stored) != roster:
        raise SecureSumError("secure sum: the coordinator sent a second, different roster for this run")
    keys = _keys(vault, facts.run_id)
    sealed = share_mask_key(keys, roster)
    if stored is None:
        put_json(vault, _role(facts.run_id, ROSTER), roster.to_dict())
    me = roster.index_of(keys)
    contract = contract_for("query.secure_shares", dp=settings.dp, n_classes=len(cohort.classes),
                            secure_keys=[f"to-{j}" for j in range(1, roster.size + 1) if j != me])
    return HandlerReply({"sealed": ("config", {f"to-{j}": c.decode() for j, c in sealed.items()})}, contract, privacy)


def mask_reply(reply: HandlerReply, message_type: str, facts: RoundFacts, site: SiteRef) -> dict[str, Any]:
    """Replace the summed record of ``reply`` by its masked vector; returns what the egress log notes.

    The record's summands (common/summands.py) are flattened, encoded in fixed point and masked;
    the reply then holds the masked vector (``masked``), its layout and the self mask's sealed
    shares (``secure``), and the metrics that are not summed.
    """
    from client.model_store import get_json

    request = json.loads(facts.secure)
    vault = site.open_vault()
    roster = _roster(vault, facts.run_id, request["roster"])
    keys = _keys(vault, facts.run_id)
    revealed = get_json(vault, _role(facts.run_id, REVEALED), {})
    parts = [int(p) for p in request["participants"]]
    if gone := sorted(set(parts) & set(revealed.get("mask_keys", []))):
        raise SecureSumError(f"secure sum: participants {gone} had their mask keys revealed earlier in this run; "
                             "this site does not mask with them")
    record = summed_record(message_type)
    metrics = reply.values("metrics")
    values = summands(message_type, reply.values(record), metrics)
    masked, sealed = mask(encode(flatten(values)), keys, roster, label=request["label"], participants=parts)
    reply.records[record] = ("array", {"masked": masked})
    reply.records["metrics"] = ("metric", plain_metrics(message_type, metrics))
    reply.records["secure"] = ("config", {"layout": json.dumps(layout(values)),
                                          **{f"self-{j}": c.decode() for j, c in sealed.items()}})
    return {"label": request["label"], "participants": parts, "summed": record, "length": int(masked.size)}


def secure_unmask(site: SiteRef, settings: RunSettings, facts: RoundFacts, sealed: dict[str, str]) -> HandlerReply:
    """The site's shares of the survivors' self masks and the dropped sites' mask keys for one release.

    Raises
    ------
    SecureSumError
        Another request for the same release was answered, a survivor's mask key was revealed
        before, fewer than the threshold survived, or a share does not open.
    """
    from client.model_store import get_json, put_json

    vault, cohort = _load(site)
    privacy = _privacy(vault, site, cohort, settings, facts)
    request = json.loads(facts.secure)
    label, survivors, dropped = request["label"], sorted(request["survivors"]), sorted(request["dropped"])
    roster = _roster(vault, facts.run_id, request["roster"])
    keys = _keys(vault, facts.run_id)
    role = _role(facts.run_id, REVEALED)
    revealed = get_json(vault, role, {"labels": {}, "mask_keys": []})
    asked = {"survivors": survivors, "dropped": dropped}
    if revealed["labels"].get(label, asked) != asked:
        raise SecureSumError(f"secure sum: release {label} was unmasked before with other survivors; this site "
                             "answers one unmask request per release")
    if bad := sorted(set(survivors) & set(revealed["mask_keys"])):
        raise SecureSumError(f"secure sum: sites {bad} had their mask keys revealed; their self masks stay hidden")
    shares = reveal(keys, roster, label=label, survivors=survivors, dropped=dropped,
                    self_mask_shares={int(k[5:]): v.encode() for k, v in sealed.items() if k.startswith("self-")},
                    mask_key_shares={int(k[4:]): v.encode() for k, v in sealed.items() if k.startswith("key-")})
    revealed["labels"][label] = asked
    revealed["mask_keys"] = sorted(set(revealed["mask_keys"]) | set(shares[MASK_KEY]))
    put_json(vault, role, revealed)  # before the shares leave: a repeat is checked against it
    out = {f"self-{s}": v.hex() for s, v in shares[SELF_MASK].items()} | \
          {f"key-{d}": v.hex() for d, v in shares[MASK_KEY].items()}
    contract = contract_for("query.secure_unmask", dp=settings.dp, n_classes=len(cohort.classes),
                            secure_keys=[f"self-{s}" for s in survivors] + [f"key-{d}" for d in dropped])
    return HandlerReply({"shares": ("config", out)}, contract, privacy)



def noise_share(vault: Any, settings: RunSettings, facts: RoundFacts, policy: Any) -> float:
    """The fraction of a release's noise standard deviation this site adds: ``1 / sqrt(t)`` when the
    release goes through the secure sum with distributed noise (the run asks for it and the site's
    policy allows it), so that any ``t`` sites' shares, the fewest an unmasked sum can hold, carry
    the whole calibrated noise; else 1."""
    if not (facts.secure and settings.secure_sum and settings.distributed_noise and policy.distributed_noise):
        return 1.0
    roster = _roster(vault, facts.run_id, json.loads(facts.secure)["roster"])
    return float(roster.threshold) ** -0.5
