"""Secure aggregation (SecAgg+, Bell et al. 2020 on Bonawitz et al. 2017, active-adversary
variant): primitives and an in-memory reference of one round's secret sharing and masking (the
message layer, :mod:`.protocol`, adds signed keys and the signed consistency check around it).

Primitives, all from ``cryptography``:
- site identity: ECDSA P-384 with SHA-384, the key a site registered with (ftclient's site
  key); it signs what a site advertises and the alive set it agrees to (see :mod:`.protocol`);
- key agreement: X25519, the shared secret through HKDF-SHA256 with a per-round context;
- shares travel sealed with AES-256-GCM (random 96-bit nonce, associated data binding sender,
  receiver and round);
- masks: a ChaCha20 keystream from a 256-bit seed (full entropy: :func:`fresh_secret`, i.e.
  ``os.urandom``, or HKDF output of fresh X25519 keys), read as little-endian uint32;
- Shamir sharing over the prime field GF(2^521 - 1) of 32-byte secrets (mask seeds, X25519
  private keys);
- updates quantized into Z_(2^32) with stochastic rounding: ``Quantizer`` clips each value to
  [-clip, clip], multiplies it by the site's weight (a whole number in 1..``max_weight``, the
  round's cap) and appends the weight itself as one more coordinate, so the coordinator divides
  the unmasked sum of values by the unmasked sum of weights, never by a number a site merely
  reported. The step is sized so that ``n_sites`` sums cannot wrap; each coordinate of the
  decoded mean is off by at most ``Quantizer.mean_error_bound``.

The coordinator sees only masked vectors: a site's masked vector is its quantized update plus
a uniformly random self-mask plus pairwise masks, hence itself uniform on Z_(2^32)^(d+1) whatever
the update. Unmasking needs ``threshold`` of a site's share holders (its neighbours and itself).
A site answers an unmask request only when it is consistent with what the site itself saw
(:func:`check_unmask_request`: alive and dropped disjoint, both made of sites that sent it
shares, together exactly those sites and itself, at least ``threshold`` alive), so a
coordinator cannot ask for both a site's self-mask and its pairwise key, nor count sites that
do not exist towards the threshold.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.common.metrics import lower_median

__all__ = [
    "MOD",
    "MOD_BITS",
    "PRIME",
    "Quantizer",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "check_threshold",
    "default_threshold",
    "round_threshold",
    "SecAggError",
    "Site",
    "agree",
    "check_unmask_request",
    "neighbours",
    "apply_masks",
    "CHUNK",
    "fresh_secret",
    "fresh_x25519",
    "identity_public",
    "load_identity",
    "load_public",
    "new_identity",
    "round_weight_cap",
    "sign",
    "unmask_view",
    "verify",
    "prg_mask",
    "private_bytes",
    "public_bytes",
    "seal",
    "shamir_combine",
    "shamir_split",
    "unmask_sum",
    "unseal",
]

MOD_BITS = 32
MOD = 1 << MOD_BITS
PRIME = (1 << 521) - 1  # a Mersenne prime: 32-byte secrets fit with room to spare
SECRET_BYTES = 32
SHARE_BYTES = 66  # an element of GF(2^521 - 1), as it travels


class SecAggError(RuntimeError):
    """The round cannot go on safely: it aborts and releases nothing."""


# ---------------------------------------------------------------- quantization


@dataclass(frozen=True)
class Quantizer:
    """Weighted updates <-> Z_(2^32), with room for ``n_sites`` sums.

    A site sends ``q = round_stochastic((w * clip(x) + max_weight * clip) / step)`` per value
    and then ``w`` itself, one more uint32 (4 bytes a value, 4 more in all). Every q lies in
    [0, 2 * max_weight * clip / step + 1] and every w in [1, max_weight], so ``n_sites`` of
    them sum below 2^32. ``max_weight`` is the round's weight cap (what the coordinator sent:
    at most secure_aggregation.max_weight, and federation.weight_cap x the median example
    count), so the step is sized to what a site may encode, and a site that follows the
    encoding cannot weigh more than the cap.
    """

    clip: float
    max_weight: int
    n_sites: int

    def __post_init__(self):
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"clip {self.clip}: expected a positive finite number")
        if self.n_sites < 1:
            raise ValueError("n_sites must be at least 1")
        if not 1 <= self.max_weight < MOD // self.n_sites:
            raise ValueError(
                f"max_weight {self.max_weight}: expected 1..{MOD // self.n_sites - 1} for {self.n_sites} sites"
            )

    @property
    def span(self) -> float:
        return 2.0 * self.max_weight * self.clip

    @property
    def step(self) -> float:
        # The largest per-site code is span/step + 1 (stochastic rounding may round up).
        return self.span * self.n_sites / (MOD - 1 - 2 * self.n_sites)

    def check_weight(self, weight: int) -> int:
        if isinstance(weight, bool) or int(weight) != weight or not 1 <= int(weight) <= self.max_weight:
            raise SecAggError(f"weight {weight}: expected a whole number in 1..{self.max_weight}")
        return int(weight)

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """-> uint32 codes of ``weight * clip(x)`` (x.size of them), then ``weight``."""
        weight = self.check_weight(weight)
        x = np.asarray(x).ravel()
        if not np.isfinite(x).all():
            raise SecAggError(f"update has {int((~np.isfinite(x)).sum())} non-finite value(s): refused before masking")
        scale, offset = weight / self.step, self.max_weight * self.clip / self.step
        out = np.empty(x.size + 1, dtype=np.uint32)
        values = out[:-1]  # a view: the weight goes last
        for start in range(0, x.size, CHUNK):  # block by block: each stays in cache
            y = np.clip(x[start : start + CHUNK], -self.clip, self.clip).astype(np.float64)
            y *= scale
            y += offset
            low = np.floor(y)
            y -= low  # the fraction: round up with that probability
            low += rng.random(y.size) < y
            values[start : start + CHUNK] = low
        out[-1] = weight
        return out

    def decode(self, total: np.ndarray, n_summed: int) -> tuple[np.ndarray, int]:
        """Sum of ``n_summed`` codes -> (the weighted mean of the values, the summed weight).
        SecAggError when the summed weight is outside [n_summed, n_summed * max_weight] or a
        value falls outside [-clip, clip] by more than the quantization bound: then the sum was
        not of such codes (a wrong share, or a vector not encoded as above), and nothing is
        released."""
        total = np.asarray(total, dtype=np.uint32)
        weight = int(total[-1]) if total.size else 0
        if not n_summed <= weight <= n_summed * self.max_weight:
            raise SecAggError(
                f"the unmasked weights sum to {weight}, outside {n_summed}..{n_summed * self.max_weight} for {n_summed} site(s) "
                "(a share or masked vector was wrong): nothing to average"
            )
        values = total[:-1].astype(np.float64) * self.step - n_summed * self.max_weight * self.clip
        mean = values / weight
        slack = self.clip + self.mean_error_bound(weight, n_summed)
        if mean.size and float(np.abs(mean).max()) > slack:
            raise SecAggError(
                "the unmasked sum is not a sum of updates (values beyond the clip range): a share or masked vector was wrong"
            )
        return mean, weight

    def mean_error_bound(self, total_weight: int, n_summed: int) -> float:
        """Largest per-coordinate error of the decoded mean from quantization (clipping aside):
        each site's stochastic rounding is off by less than one step."""
        return n_summed * self.step / total_weight


def round_weight_cap(counts: Iterable[int], factor: float | None, max_weight: int) -> int:
    """The round's weight cap: ``max_weight``, and at most ``factor`` x the lower median of the
    sites' example ``counts`` (None: no relative cap). Sites that inflate their count cannot move
    the median while they are fewer than half."""
    counts = [int(c) for c in counts]
    if factor is None or not counts:
        return int(max_weight)
    return int(max(1, min(max_weight, math.floor(factor * lower_median(counts)))))


# ---------------------------------------------------------------- masks, keys, sealing


CHUNK = 1 << 18  # values per block when streaming masks and quantizing: stays in cache


def _keystream(seed: bytes):
    if len(seed) != SECRET_BYTES:
        raise ValueError(f"mask seed: expected {SECRET_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()


def prg_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values of a ChaCha20 keystream keyed by a 32-byte seed."""
    return np.frombuffer(_keystream(seed).update(bytes(4 * length)), dtype="<u4").astype(np.uint32, copy=False)


def apply_masks(y: np.ndarray, seeds: Iterable[tuple[bytes, int]]) -> np.ndarray:
    """``y += sign * prg_mask(seed)`` for each (seed, sign) in place (mod 2^32), streaming every
    keystream block by block: the same values as :func:`prg_mask`, without a full-length
    temporary per mask."""
    streams = [(_keystream(seed), sign) for seed, sign in seeds]
    zeros = bytes(4 * CHUNK)
    for start in range(0, y.size, CHUNK):
        block = y[start : start + CHUNK]
        nbytes = 4 * block.size
        for enc, sign in streams:
            m = np.frombuffer(enc.update(zeros[:nbytes]), dtype="<u4")
            if sign > 0:
                block += m
            else:
                block -= m
    return y


def fresh_secret() -> bytes:
    """A new 32-byte secret (a self-mask seed): every mask seed of every round comes from here
    or from :func:`fresh_x25519`, never from a counter, a clock or a seed that repeats."""
    return os.urandom(SECRET_BYTES)


def fresh_x25519() -> X25519PrivateKey:
    """A new X25519 key pair for one round (the pairwise-mask keys are derived from these)."""
    return X25519PrivateKey.generate()


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: X25519, then HKDF-SHA256 bound to ``info`` (round, purpose)."""
    return _hkdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info)


def share_key(private: X25519PrivateKey, peer_public: bytes, round_tag: bytes) -> bytes:
    """The key that seals shares between two sites in one round."""
    return agree(private, peer_public, b"fedtune-secagg-share" + round_tag)


def mask_key(private: X25519PrivateKey, peer_public: bytes, round_tag: bytes) -> bytes:
    """The seed of the pairwise mask two sites add (one +, one -) in one round."""
    return agree(private, peer_public, b"fedtune-secagg-mask" + round_tag)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


# ---------------------------------------------------------------- site identity (signatures)

IDENTITY_CURVE = ec.SECP384R1()  # the curve of ftclient's site key (Flower's SuperNode authentication)


def new_identity() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 signing key (ftsim's virtual sites; a site without a registered key)."""
    return ec.generate_private_key(IDENTITY_CURVE)


def identity_public(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """A site's public identity as it travels: the P-384 point, SEC1 uncompressed (97 bytes)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def load_identity(data: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-384 private key from OpenSSH (``ftclient keygen``'s site_key) or PEM (PKCS8) bytes."""
    try:
        key = (
            serialization.load_ssh_private_key(data, None)
            if data.lstrip().startswith(b"-----BEGIN OPENSSH")
            else serialization.load_pem_private_key(data, None)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a readable private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != IDENTITY_CURVE.name:
        raise ValueError("expected an ECDSA P-384 key (ftclient keygen makes one)")
    return key


def load_public(data: bytes) -> bytes:
    """A P-384 public key from an OpenSSH line (``site_key.pub``), PEM, or SEC1 bytes -> SEC1 bytes."""
    try:
        if data[:1] == b"\x04" and len(data) == 97:
            key = ec.EllipticCurvePublicKey.from_encoded_point(IDENTITY_CURVE, data)
        elif data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a readable public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != IDENTITY_CURVE.name:
        raise ValueError("expected an ECDSA P-384 public key (site_key.pub from ftclient keygen)")
    return identity_public(key)


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    return key.sign(payload, ec.ECDSA(hashes.SHA384()))


def verify(public: bytes, signature: bytes, payload: bytes) -> bool:
    """Whether ``signature`` is ``public``'s (SEC1 P-384) over ``payload``; False for anything malformed."""
    if not isinstance(public, bytes) or not isinstance(signature, bytes):
        return False
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(IDENTITY_CURVE, public).verify(
            signature, payload, ec.ECDSA(hashes.SHA384())
        )
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ---------------------------------------------------------------- Shamir


def shamir_split(secret: bytes, threshold: int, holders: Iterable[int]) -> dict[int, int]:
    """Shares of a 32-byte secret for each holder id (ids >= 1); any ``threshold`` rebuild it."""
    holders = list(holders)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret: expected {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(holders) or len(set(holders)) != len(holders) or min(holders) < 1:
        raise ValueError(f"threshold {threshold} with {len(holders)} distinct holder ids >= 1 expected")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {h: sum(c * pow(h, k, PRIME) for k, c in enumerate(coeffs)) % PRIME for h in holders}


def shamir_combine(shares: Mapping[int, int], threshold: int) -> bytes:
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s), {threshold} needed: the secret stays hidden")
    pts = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return secret.to_bytes(SECRET_BYTES, "big")


# ---------------------------------------------------------------- neighbours, unmask checks


def neighbours(ids: list[int], k: int) -> dict[int, list[int]]:
    """A k-regular ring (Harary) graph over the sorted ids: each site's k nearest on the ring."""
    ids = sorted(ids)
    n = len(ids)
    if not 1 <= k < n:
        raise ValueError(f"neighbours {k}: expected 1..{n - 1} for {n} sites")
    out: dict[int, list[int]] = {}
    for pos, i in enumerate(ids):
        near = {ids[(pos + d) % n] for d in range(1, k // 2 + 1)} | {ids[(pos - d) % n] for d in range(1, k // 2 + 1)}
        if k % 2:
            near.add(ids[(pos + n // 2) % n])
        out[i] = sorted(near - {i})
    return out


def default_threshold(holders: int) -> int:
    """A majority of a site's share holders (its neighbours and itself)."""
    return holders // 2 + 1


def round_threshold(threshold: int | None, neighbours: int | None, n_invited: int) -> tuple[int, int]:
    """-> (neighbours each of ``n_invited`` sites has, the round's threshold): the configured
    ``threshold``, or a majority of each site's share holders (its neighbours and itself)."""
    k = min(neighbours or n_invited - 1, n_invited - 1)
    return k, threshold or default_threshold(k + 1)


def check_threshold(threshold: int, holders: int) -> str | None:
    """Why ``threshold`` is unsafe or unusable for ``holders`` share holders, else None.

    Above half: a coordinator then cannot gather a site's self-mask shares and its mask-key
    shares from two disjoint groups of holders. At most all: else nothing could be unmasked."""
    if not holders / 2 < threshold <= holders:
        return f"threshold {threshold} with {holders} share holders: expected {holders // 2 + 1}..{holders}"
    return None


def unmask_view(u3: Iterable[int], senders: Iterable[int], me: int) -> tuple[list[int], list[int]]:
    """What one site is asked to reveal, given the alive set ``u3`` (the sites whose masked
    vectors are summed) and ``senders`` (the neighbours whose shares it received):
    -> (alive: its share holders in u3, itself included; dropped: senders not in u3)."""
    u3, senders = set(u3), set(senders)
    return sorted(u3 & (senders | {me})), sorted(senders - u3)


def check_unmask_request(
    alive: Iterable[int], dropped: Iterable[int], threshold: int, me: int, senders: Iterable[int]
) -> None:
    """Refuse (SecAggError) an unmask request that is not this site's own view of the round:
    ``alive`` and ``dropped`` disjoint; ``alive`` this site and sites that sent it shares;
    ``dropped`` sites that sent it shares (they completed key sharing) but are not summed;
    together exactly those sites and itself; at least ``threshold`` alive. ``senders``: the
    neighbours whose shares this site received."""
    alive, dropped, senders = set(alive), set(dropped), set(senders)
    if alive & dropped:
        raise SecAggError(f"unmask request lists sites {sorted(alive & dropped)} as both alive and dropped: refused")
    if me not in alive:
        raise SecAggError("unmask request lists this site, which uploaded, as not alive: refused")
    strangers = (alive | dropped) - senders - {me}
    if strangers:
        raise SecAggError(
            f"unmask request lists sites {sorted(strangers)[:5]} that sent this site no shares (not its share holders): refused"
        )
    if senders - alive - dropped:
        raise SecAggError(
            f"unmask request leaves out sites {sorted(senders - alive - dropped)[:5]} that sent this site shares: refused"
        )
    if len(alive) < threshold:
        raise SecAggError(
            f"unmask request lists {len(alive)} alive site(s), fewer than the threshold {threshold}: refused"
        )


# ---------------------------------------------------------------- one round, in memory


@dataclass
class Site:
    """One site's side of a round (in-memory reference; messages are the method calls)."""

    sid: int
    round_tag: bytes
    c_key: X25519PrivateKey = field(default_factory=lambda: fresh_x25519())  # seals shares
    s_key: X25519PrivateKey = field(default_factory=lambda: fresh_x25519())  # pairwise masks
    self_seed: bytes = field(default_factory=lambda: fresh_secret())
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # from site j: (share of b_j, share of s_j)

    def advertise(self) -> tuple[bytes, bytes]:
        return public_bytes(self.c_key), public_bytes(self.s_key)

    def share_keys(self, keys: Mapping[int, tuple[bytes, bytes]], nbrs: list[int], threshold: int) -> dict[int, bytes]:
        """Shares of the self-mask seed and the pairwise-mask key for each neighbour (sealed to
        it) and for this site itself (kept: an alive site helps rebuild its own self-mask)."""
        holders = sorted({*nbrs, self.sid})
        b_shares = shamir_split(self.self_seed, threshold, holders)
        s_shares = shamir_split(private_bytes(self.s_key), threshold, holders)
        self.held[self.sid] = (b_shares[self.sid], s_shares[self.sid])
        out = {}
        for j in nbrs:
            plain = b_shares[j].to_bytes(SHARE_BYTES, "big") + s_shares[j].to_bytes(SHARE_BYTES, "big")
            out[j] = seal(share_key(self.c_key, keys[j][0], self.round_tag), plain, self._aad(self.sid, j))
        return out

    def _aad(self, sender: int, receiver: int) -> bytes:
        return self.round_tag + sender.to_bytes(8, "big") + receiver.to_bytes(8, "big")

    def receive_shares(self, keys: Mapping[int, tuple[bytes, bytes]], sealed: Mapping[int, bytes]) -> None:
        for j, ct in sealed.items():
            plain = unseal(share_key(self.c_key, keys[j][0], self.round_tag), ct, self._aad(j, self.sid))
            self.held[j] = (int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big"))

    def masked_input(self, code: np.ndarray, keys: Mapping[int, tuple[bytes, bytes]], nbrs: list[int]) -> np.ndarray:
        """code + self-mask + sum over neighbours of +-pairwise mask (+ towards higher ids), mod 2^32."""
        seeds = [(self.self_seed, 1)]
        for j in nbrs:
            seeds.append((mask_key(self.s_key, keys[j][1], self.round_tag), 1 if self.sid < j else -1))
        return apply_masks(np.array(code, dtype=np.uint32), seeds)  # a copy; uint32 arithmetic wraps: mod 2^32

    def unmask(self, alive: Iterable[int], dropped: Iterable[int], threshold: int) -> dict[str, dict[int, int]]:
        """The shares the request asks for, if it is this site's own view of the round (the
        senders being the sites whose shares it holds)."""
        alive, dropped = set(alive), set(dropped)
        check_unmask_request(alive, dropped, threshold, self.sid, set(self.held) - {self.sid})
        return {
            "self_seed": {j: b for j, (b, _) in self.held.items() if j in alive},
            "pair_key": {j: s for j, (_, s) in self.held.items() if j in dropped and j != self.sid},
        }


def unmask_sum(
    total: np.ndarray,
    alive: Iterable[int],
    keys: Mapping[int, tuple[bytes, bytes]],
    shared: Iterable[int],
    nbrs: Mapping[int, list[int]],
    answers: Mapping[int, dict[str, dict[int, int]]],
    threshold: int,
    round_tag: bytes,
) -> np.ndarray:
    """The coordinator's last step: from ``total``, the mod-2^32 sum of the masked vectors of the
    ``alive`` sites (it keeps only that sum, never one site's vector), remove the survivors'
    self-masks and the pairwise masks that dropped sites' partners added. ``shared``: the sites
    that completed key sharing (each masked with exactly those of its neighbours). Raises
    SecAggError (nothing released) below the threshold."""
    alive = set(alive)
    if len(answers) < threshold:
        raise SecAggError(
            f"only {len(answers)} site(s) answered the unmask request, {threshold} needed: round aborted, nothing released"
        )
    seeds = []
    for i in sorted(alive):
        shares = {h: a["self_seed"][i] for h, a in answers.items() if i in a["self_seed"]}
        seeds.append((shamir_combine(shares, threshold), -1))
    dropped = set(shared) - alive
    for j in sorted(dropped):
        shares = {h: a["pair_key"][j] for h, a in answers.items() if j in a["pair_key"]}
        s_j = X25519PrivateKey.from_private_bytes(shamir_combine(shares, threshold))
        for i in nbrs[j]:
            if i in alive:  # i added +m_ij if i < j else -m_ij; take it back
                seeds.append((mask_key(s_j, keys[i][1], round_tag), -1 if i < j else 1))
    return apply_masks(np.array(total, dtype=np.uint32), seeds)
