"""SecAgg+ over Flower messages: what the coordinator and a site agree on.

A secure round is four exchanges, each with its own deadline; sites are numbered 1..n for the
round (Shamir x-coordinates), and every message carries a fresh random 16-byte round tag that
binds keys, shares and masks to this round of this run:

1. ``train.advertise`` + record ``secagg`` {round-tag, sid, n-sites, clip, max-weight}: the site
   draws two X25519 key pairs and a self-mask seed, keeps them (with the round's settings) in
   its own Flower context (``context.state``, which stays at the site: the SuperNode's memory
   in deployment, the simulation's node state in ftsim), and answers with the public keys.
2. ``train.share_keys`` {round-tag, threshold, nbr-ids, nbr-c, nbr-s}: its neighbours and their
   public keys. The site Shamir-shares its self-mask seed and its mask key among its neighbours
   and itself and answers with each neighbour's shares sealed (AES-GCM) to that neighbour.
3. ``train`` = the plain round's TRAIN message (global adapter, config) + {round-tag, from,
   sealed}: the shares sealed to this site. The site trains, checks its update (finite, right
   shapes), quantizes it with its weight folded in, masks it with its self-mask and a pairwise
   mask per neighbour that shared keys, and answers with the masked vector (uint32) and its
   metrics. The update itself is never stored or sent.
4. ``train.unmask`` {round-tag, alive, dropped}: the site checks the request (disjoint sets,
   at least ``threshold`` alive, asked once) and answers with the shares that let the
   coordinator remove alive sites' self-masks and dropped sites' pairwise masks.

A site refuses anything out of order, for another round, or unsafe, with status ``refused``
and a reason; the coordinator treats it as a dropout.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .primitives import SHARE_BYTES

RECORD = "secagg"
MASKED = "masked"
STATE = "fedtune-secagg"
TAG_BYTES = 16

ADVERTISE = "train.advertise"
SHARE_KEYS = "train.share_keys"
UNMASK = "train.unmask"
STAGES = (ADVERTISE, SHARE_KEYS, UNMASK)  # stage 3 is the TRAIN message itself

# Where a site's state is between stages: which stage it completed last.
DONE_ADVERTISE, DONE_SHARE, DONE_UPLOAD = 1, 2, 3


def ints_to_bytes(values: list[int]) -> list[bytes]:
    return [v.to_bytes(SHARE_BYTES, "big") for v in values]


def bytes_to_ints(values: list[bytes]) -> list[int]:
    return [int.from_bytes(v, "big") for v in values]


RAW_STYPE = "fedtune.uint32-le"  # the bare little-endian values, no .npy header: 4 bytes a value on the wire


def masked_record(y: np.ndarray) -> ArrayRecord:
    y = np.ascontiguousarray(y, dtype="<u4")
    return ArrayRecord({"y": Array(dtype="<u4", shape=(int(y.size),), stype=RAW_STYPE, data=y.tobytes())})


def read_masked(content, length: int) -> np.ndarray:
    """The masked uint32 vector of a reply; ValueError when it is missing or malformed."""
    if MASKED not in content:
        raise ValueError("no masked vector in the reply")
    rec = content[MASKED]
    if list(rec.keys()) != ["y"]:
        raise ValueError("masked record: expected one vector 'y'")
    a = rec["y"]
    if a.stype != RAW_STYPE or a.dtype != "<u4" or tuple(a.shape) != (length,) or len(a.data) != 4 * length:
        raise ValueError(f"masked vector: {a.stype} {a.dtype} {tuple(a.shape)}, expected {RAW_STYPE} <u4 ({length},)")
    return np.frombuffer(a.data, dtype="<u4")
