"""Secure sum: the coordinator learns the sum of the sites' vectors, and of any one site nothing more.

The protocol of Bonawitz et al. (CCS 2017), which Flower's SecAgg+ implements on its legacy stack,
here over genofed's own messages (docs/security.md):

1. **Keys** (once per run). Each site makes two key pairs: one to agree pairwise mask keys with
   every other site, one to encrypt what it sends another site through the coordinator. The
   coordinator publishes every public key in a :class:`Roster` with the threshold ``t``.
2. **Shares of the mask key** (once per run). Each site splits its mask private key into Shamir
   shares, any ``t`` of which rebuild it, and sends each site its share encrypted for it.
3. **A masked release** (every summed reply). A site encodes its vector in fixed point modulo
   2**64, adds a fresh random self mask and, for every other participant, the stream of their
   agreed key (added by the lower index, subtracted by the higher, so pairs cancel in the sum),
   and sends the encrypted Shamir shares of its self-mask seed with it.
4. **Unmask.** The coordinator names the sites whose masked vectors arrived (survivors) and the
   participants that did not (dropped). Each survivor returns the shares of the survivors' self
   masks and of the dropped sites' mask keys, never both for one site, and only when at least
   ``t`` survived. The coordinator rebuilds the self masks and the dropped sites' pairwise masks
   and subtracts them: what is left is the sum.

Mask streams are ChaCha20 keystreams of a 256-bit key with a nonce from the release's label, not
Flower's ``pseudo_rand_gen`` (which folds its seed to 32 bits: one masked vector could be
unmasked by searching 2**32 seeds). Fixed point keeps :data:`FRACTION_BITS` bits after the point,
so the sum is exact to ``sites * 2**-27`` per entry; a site refuses to encode a value whose sum
could wrap (:data:`LIMIT`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import GenofedError

FRACTION_BITS = 26
"""Bits after the point of the fixed-point encoding (2**-26 is about 1.5e-8)."""
LIMIT = 2.0 ** (63 - FRACTION_BITS - 12)
"""Largest magnitude a site may encode: the sum of 4,096 of them cannot wrap around 2**63."""
_SCALE = float(2**FRACTION_BITS)
SELF_MASK = "self-mask"
MASK_KEY = "mask-key"


class SecureSumError(GenofedError):
    """A secure-sum step cannot go on (too few sites, a value out of range, a share that does not open)."""


@functools.cache
def _flw() -> Any:
    from common.flower_internals import check_secagg_internals

    return check_secagg_internals()


# ---------------------------------------------------------------------------------------------
# Encoding and mask streams


def encode(vector: np.ndarray) -> np.ndarray:
    """``vector`` in fixed point modulo 2**64 (uint64).

    Raises
    ------
    SecureSumError
        A value is not finite or larger than :data:`LIMIT` in magnitude.
    """
    v = np.asarray(vector, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise SecureSumError("secure sum: the release holds a value that is not finite; nothing was sent")
    if v.size and float(np.abs(v).max()) >= LIMIT:
        raise SecureSumError(f"secure sum: a value of the release is {float(np.abs(v).max()):.3g}, beyond the "
                             f"fixed-point limit {LIMIT:.3g}; nothing was sent")
    return np.rint(v * _SCALE).astype(np.int64).view(np.uint64)


def decode(encoded: np.ndarray) -> np.ndarray:
    """The float64 values of a fixed-point vector (a sum of :func:`encode` outputs)."""
    return np.asarray(encoded, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE


def mask_stream(key: bytes, label: str, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 from a 256-bit ``key`` and the release's ``label`` (ChaCha20)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = hashlib.sha256(label.encode("utf-8")).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype=np.uint64).copy()


# ---------------------------------------------------------------------------------------------
# Keys and the roster


@dataclass(frozen=True)
class SiteKeys:
    """A site's two private keys for one run (PEM): ``cipher`` encrypts shares, ``mask`` agrees masks."""

    cipher: bytes
    mask: bytes

    @classmethod
    def generate(cls) -> SiteKeys:
        flw = _flw()
        return cls(*(flw.private_key_to_bytes(flw.generate_key_pairs()[0]) for _ in range(2)))

    def public(self) -> tuple[bytes, bytes]:
        """The public keys (PEM): cipher, mask."""
        flw = _flw()
        return tuple(flw.public_key_to_bytes(flw.bytes_to_private_key(k).public_key())
                     for k in (self.cipher, self.mask))  # type: ignore[return-value]

    def to_bytes(self) -> bytes:
        return json.dumps({"cipher": self.cipher.decode(), "mask": self.mask.decode()}).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> SiteKeys:
        d = json.loads(blob)
        return cls(d["cipher"].encode(), d["mask"].encode())


def default_threshold(n_sites: int) -> int:
    """More than half of the sites: two disjoint groups can never both reach it."""
    return n_sites // 2 + 1


@dataclass(frozen=True)
class Roster:
    """The run's secure-sum sites by index (1-based), their public keys, and the threshold."""

    cipher_keys: tuple[bytes, ...]
    mask_keys: tuple[bytes, ...]
    threshold: int

    def __post_init__(self) -> None:
        n = len(self.cipher_keys)
        if n < 2 or len(self.mask_keys) != n:
            raise SecureSumError(f"secure sum needs at least 2 sites with two public keys each (got {n})")
        if not default_threshold(n) <= self.threshold <= n:
            raise SecureSumError(f"secure sum: threshold {self.threshold} for {n} sites must be more than half of "
                                 f"them and at most all ({default_threshold(n)}-{n})")

    @property
    def size(self) -> int:
        return len(self.cipher_keys)

    def digest(self) -> str:
        h = hashlib.sha256(str(self.threshold).encode())
        for key in (*self.cipher_keys, *self.mask_keys):
            h.update(hashlib.sha256(key).digest())
        return h.hexdigest()

    def index_of(self, keys: SiteKeys) -> int:
        """The site's index, found by its public keys.

        Raises
        ------
        SecureSumError
            Its keys are not in the roster.
        """
        cipher, mask = keys.public()
        for i, (c, m) in enumerate(zip(self.cipher_keys, self.mask_keys), start=1):
            if (c, m) == (cipher, mask):
                return i
        raise SecureSumError("secure sum: this site's public keys are not in the coordinator's roster")

    def to_dict(self) -> dict[str, Any]:
        return {"cipher_keys": [k.decode() for k in self.cipher_keys],
                "mask_keys": [k.decode() for k in self.mask_keys], "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Roster:
        return cls(tuple(k.encode() for k in d["cipher_keys"]), tuple(k.encode() for k in d["mask_keys"]),
                   int(d["threshold"]))

    def check_participants(self, participants: Iterable[int], me: int | None = None) -> list[int]:
        """Sorted participants, checked: known indices, at least the threshold of them, ``me`` among them."""
        parts = sorted(set(int(p) for p in participants))
        if any(not 1 <= p <= self.size for p in parts):
            raise SecureSumError(f"secure sum: participants {parts} are not all in the roster of {self.size}")
        if len(parts) < self.threshold:
            raise SecureSumError(f"secure sum: {len(parts)} participant(s), fewer than the threshold "
                                 f"{self.threshold}: the sum would not hide one site")
        if me is not None and me not in parts:
            raise SecureSumError(f"secure sum: this site (index {me}) is not among the participants {parts}")
        return parts


def _fernet_key(own_private: bytes, peer_public: bytes) -> bytes:
    flw = _flw()
    return flw.generate_shared_key(flw.bytes_to_private_key(own_private), flw.bytes_to_public_key(peer_public))


def _pair_key(own_mask_private: bytes, peer_mask_public: bytes) -> bytes:
    """The 32-byte mask key two sites agree on (ECDH, then HKDF; the same from either side)."""
    return base64.urlsafe_b64decode(_fernet_key(own_mask_private, peer_mask_public))


def _seal(keys: SiteKeys, roster: Roster, *, me: int, to: int, kind: str, label: str, share: bytes) -> bytes:
    plain = json.dumps({"kind": kind, "label": label, "src": me, "dst": to, "share": share.hex()}).encode("utf-8")
    return _flw().encrypt(_fernet_key(keys.cipher, roster.cipher_keys[to - 1]), plain)


def _open(keys: SiteKeys, roster: Roster, *, me: int, src: int, kind: str, label: str, sealed: bytes) -> bytes:
    try:
        plain = json.loads(_flw().decrypt(_fernet_key(keys.cipher, roster.cipher_keys[src - 1]), sealed))
    except Exception:  # cryptography's InvalidToken, or not JSON: either way the share cannot be used
        raise SecureSumError(f"secure sum: the share from site {src} does not open with its key") from None
    if (plain.get("kind"), plain.get("label"), plain.get("src"), plain.get("dst")) != (kind, label, src, me):
        raise SecureSumError(f"secure sum: the share from site {src} is for another release, site or kind")
    return bytes.fromhex(plain["share"])


def _shares_for(secret: bytes, keys: SiteKeys, roster: Roster, *, me: int, to: Iterable[int], kind: str,
                label: str) -> dict[int, bytes]:
    shares = _flw().create_shares(secret, roster.threshold, roster.size)
    return {j: _seal(keys, roster, me=me, to=j, kind=kind, label=label, share=shares[j - 1]) for j in to}


# ---------------------------------------------------------------------------------------------
# A site's steps


def share_mask_key(keys: SiteKeys, roster: Roster) -> dict[int, bytes]:
    """Step 2: the site's mask private key in Shamir shares, each sealed for one other site."""
    me = roster.index_of(keys)
    others = [j for j in range(1, roster.size + 1) if j != me]
    return _shares_for(keys.mask, keys, roster, me=me, to=others, kind=MASK_KEY, label=roster.digest())


def mask(encoded: np.ndarray, keys: SiteKeys, roster: Roster, *, label: str,
         participants: Iterable[int]) -> tuple[np.ndarray, dict[int, bytes]]:
    """Step 3: ``encoded`` (from :func:`encode`) masked, and the self mask's sealed shares by participant.

    ``label`` names the release uniquely within the run; every participant must use the same.
    """
    me = roster.index_of(keys)
    parts = roster.check_participants(participants, me)
    seed = os.urandom(32)
    out = np.asarray(encoded, dtype=np.uint64) + mask_stream(seed, label, len(encoded))
    for j in parts:
        if j != me:
            stream = mask_stream(_pair_key(keys.mask, roster.mask_keys[j - 1]), label, len(encoded))
            out = out + stream if me < j else out - stream
    return out, _shares_for(seed, keys, roster, me=me, to=parts, kind=SELF_MASK, label=label)


def reveal(keys: SiteKeys, roster: Roster, *, label: str, survivors: Iterable[int], dropped: Iterable[int],
           self_mask_shares: Mapping[int, bytes], mask_key_shares: Mapping[int, bytes]) -> dict[str, dict[int, bytes]]:
    """Step 4 on a site: its shares of the survivors' self masks and of the dropped sites' mask keys.

    Raises
    ------
    SecureSumError
        Fewer than the threshold survived, a site is named both ways, or a sealed share is for
        another site, kind or release.
    """
    me = roster.index_of(keys)
    alive, gone = set(int(s) for s in survivors), set(int(d) for d in dropped)
    roster.check_participants(alive, me)
    if alive & gone:
        raise SecureSumError(f"secure sum: sites {sorted(alive & gone)} are named both survivor and dropped")
    if set(self_mask_shares) - alive or set(mask_key_shares) - gone:
        raise SecureSumError("secure sum: a share asked for is not of a survivor's self mask or a dropped "
                             "site's mask key")
    return {SELF_MASK: {s: _open(keys, roster, me=me, src=s, kind=SELF_MASK, label=label, sealed=c)
                        for s, c in self_mask_shares.items()},
            MASK_KEY: {d: _open(keys, roster, me=me, src=d, kind=MASK_KEY, label=roster.digest(), sealed=c)
                       for d, c in mask_key_shares.items()}}


# ---------------------------------------------------------------------------------------------
# The coordinator's step


def _combine(shares: list[bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecureSumError(f"secure sum: {len(shares)} share(s) of {what}, the threshold is {threshold}")
    try:
        return _flw().combine_shares(shares[:threshold])
    except ValueError:
        raise SecureSumError(f"secure sum: the shares of {what} do not combine") from None


def unmask(masked: Mapping[int, np.ndarray], roster: Roster, *, label: str, participants: Iterable[int],
           self_mask_shares: Mapping[int, list[bytes]], mask_key_shares: Mapping[int, list[bytes]]) -> np.ndarray:
    """Step 4 on the coordinator: the fixed-point sum of the survivors' vectors.

    ``masked`` holds the survivors' masked vectors by index; the participants missing from it
    are the dropped sites, whose mask keys are rebuilt from ``mask_key_shares`` to take their
    pairwise masks out of the survivors' vectors.
    """
    parts = roster.check_participants(participants)
    alive = sorted(masked)
    roster.check_participants(alive)
    if set(alive) - set(parts):
        raise SecureSumError("secure sum: a masked vector from a site that was not asked")
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint64)
    for u in alive:
        total = total + np.asarray(masked[u], dtype=np.uint64)
        seed = _combine(self_mask_shares.get(u, []), roster.threshold, f"site {u}'s self mask")
        total = total - mask_stream(seed, label, length)
    for d in sorted(set(parts) - set(alive)):
        key = _combine(mask_key_shares.get(d, []), roster.threshold, f"dropped site {d}'s mask key")
        for u in alive:
            stream = mask_stream(_pair_key(key, roster.mask_keys[u - 1]), label, length)
            total = total - stream if u < d else total + stream  # what u added for the pair (u, d)
    return total
