"""SecAgg+ over Flower messages: what the coordinator and a site agree on.

A secure round is five exchanges, each with its own deadline; sites are numbered 1..n for the
round (Shamir x-coordinates), and every message carries a fresh random 16-byte round tag that
binds keys, shares, masks and signatures to this round; signatures also bind the Flower run.
Every site signs with its identity key (ECDSA P-384: the site key it registered with, or in
ftsim a key made for each virtual site), and every peer's signature is checked against the
public key the coordinator publishes for that peer (and, with ``ftclient --peer-keys``, against
the site's own pinned copy of the registered keys):

1. ``train.advertise`` + records ``secagg`` {round-tag, sid, n-sites, clip, max-weight} and
   ``config`` (the round's config: whether counts are asked for): the site draws two X25519 key
   pairs and a self-mask seed, keeps them in its own Flower context (``context.state``, which
   stays at the site), and answers with the public keys, its signature over
   :func:`advert_payload`, its identity's public key and (weighting by examples, no DP) its
   example count.
2. ``train.share_keys`` {round-tag, threshold, weight-cap, nbr-ids, nbr-c, nbr-s, nbr-sig,
   nbr-pk, nbr-node}: its neighbours, their public keys and signatures, and the published
   identity key and Flower node of each. The site checks every signature, refuses repeated keys
   and (trust on first use) a node whose published key changed during the run; then it
   Shamir-shares its self-mask seed and its mask key among its neighbours and itself and
   answers with each neighbour's shares sealed (AES-GCM) to that neighbour.
3. ``train`` = the plain round's TRAIN message + {round-tag, from, sealed}: the shares sealed to
   this site. The site trains, checks its update (finite, right shapes), quantizes weight x
   update and appends the weight, min(its example count, weight-cap) (1 under
   federation.weighting "equal" or DP), masks the d + 1 values with its self-mask and a pairwise
   mask per neighbour that shared keys, and answers with the masked vector (uint32).
4. ``train.consistency`` {round-tag, alive}: the alive set U3 (the sites whose vectors are
   summed). The site signs :func:`alive_payload` (once per round) and answers with the
   signature.
5. ``train.unmask`` {round-tag, u3, alive, dropped, sig-ids, sigs}: the site checks that u3 is
   the set it signed, that at least ``threshold`` of its share holders in u3 signed that same
   set, and that alive/dropped are its own view of u3 (:func:`.primitives.check_unmask_request`),
   then answers, once, with the shares that let the coordinator remove alive sites'
   self-masks and dropped sites' pairwise masks.

A site refuses anything out of order, for another round, or unsafe, with status ``refused``
and a reason, and forgets the round; the coordinator treats it as a dropout.

Each stage's request and reply, their keys, types and sizes, are classes of
:mod:`fedtune.common.messages` (AdvertiseRequest/AdvertiseReply, ShareKeysRequest/ShareKeysReply,
SecureTrainRequest, ConsistencyRequest/ConsistencyReply, UnmaskRequest/UnmaskReply); this module
keeps the protocol's names, what is signed, and the masked vector's encoding.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .primitives import SHARE_BYTES

RECORD = "secagg"
MASKED = "masked"
STATE = "fedtune-secagg"
TAG_BYTES = 16

PEERS = "fedtune-secagg-peers"  # trust on first use: each Flower node's identity key, for the whole run
IDENTITY = "fedtune-secagg-identity"  # a site with no registered key: the one it made for this run

ADVERTISE = "train.advertise"
SHARE_KEYS = "train.share_keys"
CONSISTENCY = "train.consistency"
UNMASK = "train.unmask"
STAGES = (ADVERTISE, SHARE_KEYS, CONSISTENCY, UNMASK)  # stage 3 is the TRAIN message itself

# Where a site's state is between stages: which stage it completed last.
DONE_ADVERTISE, DONE_SHARE, DONE_UPLOAD, DONE_CONSISTENCY = 1, 2, 3, 4


def _ids(values) -> bytes:
    return len(values).to_bytes(8, "big") + b"".join(int(v).to_bytes(8, "big") for v in values)


def advert_payload(run_id: int, tag: bytes, sid: int, c_pub: bytes, s_pub: bytes) -> bytes:
    """What a site signs at advertisement: its two X25519 public keys, bound to the run, the
    round and its number in the round."""
    return (
        b"fedtune-secagg/advertise/v2"
        + (int(run_id) % (1 << 64)).to_bytes(8, "big")
        + tag
        + int(sid).to_bytes(8, "big")
        + c_pub
        + s_pub
    )


def alive_payload(run_id: int, tag: bytes, alive) -> bytes:
    """What a site signs at the consistency check: the alive set U3 of the run's round."""
    return (
        b"fedtune-secagg/consistency/v2"
        + (int(run_id) % (1 << 64)).to_bytes(8, "big")
        + tag
        + _ids(sorted(int(a) for a in alive))
    )


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
