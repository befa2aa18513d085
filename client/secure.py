"""A site's side of a secure round (SecAgg+ against an active coordinator; the message flow is
in :mod:`fedtune.common.secagg.protocol`).

Each function takes the coordinator's ``secagg`` record and the site's Flower context, checks
that the request is in order and safe, and returns the record (or, after training, the masked
vector) to answer with. The requests and answers are the stage classes of
:mod:`fedtune.common.messages` (keys, types and sizes checked there; a malformed request is
refused like an unsafe one). Anything out of order or unsafe raises :class:`SecAggError`; the caller
answers ``refused`` with the reason, and the site forgets the round. What a site checks before
it gives anything away: every neighbour's advertised keys carry a valid signature by the
identity key published for it, identity keys do not repeat and (trust on first use) do not
change for a node during the run, and, with pinned peer keys (``ftclient --peer-keys``), are
among the pinned ones; an unmask request names exactly the alive set this site signed, carries
at least ``threshold`` valid signatures on it from this site's share holders, and is this
site's own view of it (:func:`fedtune.common.secagg.check_unmask_request`).

The site's secrets (two X25519 private keys, its self-mask seed, the shares it holds) live
only in ``context.state`` and are wiped when the round ends; its signing key is the one it was
given (:class:`Identity`, never sent) or one made for the run; its update goes from training
straight to masking and is never stored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context

from fedtune.common.messages import (
    ROUND_TAG_KEY,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    MessageError,
    SecureTrainRequest,
    ShareKeysReply,
    ShareKeysRequest,
    StageTask,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.common.secagg import (
    Quantizer,
    SecAggError,
    Site,
    check_threshold,
    check_unmask_request,
    identity_public,
    load_identity,
    load_public,
    new_identity,
    private_bytes,
    sign,
    unmask_view,
    verify,
)
from fedtune.common.secagg import protocol as p


@dataclass(frozen=True)
class Identity:
    """A site's signing key (ECDSA P-384; it never leaves the site) and, optionally, the peers'
    public keys it pins: then every neighbour's published key must be one of them."""

    key: ec.EllipticCurvePrivateKey
    pinned: frozenset[bytes] | None = None

    @property
    def public(self) -> bytes:
        return identity_public(self.key)

    @classmethod
    def from_files(cls, key_file: str | Path, peer_keys: str | Path | None = None) -> "Identity":
        """``key_file``: ftclient's site key (OpenSSH or PEM); ``peer_keys``: a folder of the
        registered sites' ``*.pub`` (this site's own may be among them). ValueError names the file."""
        try:
            key = load_identity(Path(key_file).read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"{key_file}: {e}") from None
        return cls(key, load_pins(peer_keys) if peer_keys else None)


def load_pins(folder: str | Path) -> frozenset[bytes]:
    """The public keys (``*.pub``) in ``folder``, each checked to be a P-384 site key."""
    d = Path(folder)
    if not d.is_dir():
        raise ValueError(f"{d}: not a folder (expected the registered sites' *.pub files)")
    pins = set()
    for f in sorted(d.glob("*.pub")):
        try:
            pins.add(load_public(f.read_bytes()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: {e}") from None
    if not pins:
        raise ValueError(f"{d}: no *.pub file (expected the registered sites' public keys)")
    return frozenset(pins)


def identity_for(context: Context, given: Identity | None) -> Identity:
    """``given``, or (a site run without a site key: ``ftclient --insecure``) a key made for this
    run and kept in the site's context. Such a key is trusted on first use only."""
    if given is not None:
        return given
    if p.IDENTITY in context.state:
        return Identity(serialization.load_der_private_key(context.state[p.IDENTITY]["key"], None))
    key = new_identity()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    context.state[p.IDENTITY] = ConfigRecord({"key": der})
    return Identity(key)


def flatten_update(delta: Mapping[str, object], reference: Mapping[str, object]) -> np.ndarray:
    """The update as one float64 vector in the order of ``reference`` (the global adapter the
    coordinator sent), after checking it has exactly the reference's tensors and shapes."""
    if set(delta) != set(reference):
        missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
        raise SecAggError(
            f"update does not match the global adapter (missing {missing[:2]}, unexpected {extra[:2]}): refused before masking"
        )
    parts = []
    for name, ref in reference.items():
        a = np.asarray(delta[name], dtype=np.float64)
        if tuple(a.shape) != tuple(ref.shape):
            raise SecAggError(
                f"update tensor {name}: shape {tuple(a.shape)}, expected {tuple(ref.shape)}: refused before masking"
            )
        parts.append(a.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def _tag(sa) -> bytes:
    """The round tag of a request: a stage class of fedtune.common.messages, its record, or the tag as sent."""
    tag = sa.round_tag if hasattr(sa, "round_tag") else sa.get(ROUND_TAG_KEY) if hasattr(sa, "get") else sa
    if not isinstance(tag, bytes) or len(tag) != p.TAG_BYTES:
        raise SecAggError(f"round tag (key {ROUND_TAG_KEY!r}): expected {p.TAG_BYTES} bytes: refused")
    return tag


def _read(sa, cls):
    """The request ``sa`` (a record, or already read) as the stage class ``cls``; SecAggError when it is not one."""
    if isinstance(sa, cls):
        return sa
    try:
        return cls.from_record(sa)
    except MessageError as e:
        raise SecAggError(f"{e}: refused") from None


def _state(context: Context, sa, stage_done: int) -> ConfigRecord:
    """This round's saved state, when the site completed ``stage_done`` of the same round."""
    if p.STATE not in context.state:
        raise SecAggError("no secure round in progress at this site (it restarted, or the round ended): refused")
    st = context.state[p.STATE]
    if st["round-tag"] != _tag(sa):
        raise SecAggError("request for another round than the one in progress: refused")
    if int(st["stage"]) != stage_done:
        raise SecAggError(
            f"request out of order (this site completed stage {int(st['stage'])}, the request needs stage {stage_done}): refused"
        )
    return st


def _site(st: ConfigRecord) -> Site:
    site = Site(
        int(st["sid"]),
        st["round-tag"],
        c_key=X25519PrivateKey.from_private_bytes(st["c-key"]),
        s_key=X25519PrivateKey.from_private_bytes(st["s-key"]),
        self_seed=st["self-seed"],
    )
    if "held-ids" in st:
        site.held = dict(zip(st["held-ids"], zip(p.bytes_to_ints(st["held-b"]), p.bytes_to_ints(st["held-s"]))))
    return site


def _keys(st: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    return {int(j): (c, s) for j, c, s in zip(st["nbr-ids"], st["nbr-c"], st["nbr-s"])}


def _senders(st: ConfigRecord) -> set[int]:
    """The neighbours whose shares this site received (it holds a share from each, and its own)."""
    return {int(j) for j in st["held-ids"]} - {int(st["sid"])}


def _quantizer(st: ConfigRecord, cap: int | None = None) -> Quantizer:
    return Quantizer(float(st["clip"]), int(st["weight-cap"] if cap is None else cap), int(st["n-sites"]))


def advertise(
    context: Context, sa: ConfigRecord | AdvertiseRequest, identity: Identity | None = None, examples: int | None = None
) -> ConfigRecord:
    """Stage 1: draw this round's two X25519 key pairs and self-mask seed, keep them here with
    the round's quantization settings; answer with the two public keys signed by this site's
    identity, that identity's public key, and ``examples`` (this site's example count) when given."""
    forget(context)  # whatever an earlier, unfinished round left
    identity = identity_for(context, identity)
    req = _read(sa, AdvertiseRequest)
    tag, sid, n = _tag(req), req.sid, req.n_sites
    if not 1 <= sid <= n or n < 2:
        raise SecAggError(f"site number {sid} of {n}: expected 1..n with n >= 2")
    try:
        Quantizer(req.clip, req.max_weight, n)
    except ValueError as e:
        raise SecAggError(f"quantization settings: {e}: refused") from None
    site = Site(sid, tag)
    c_pub, s_pub = site.advertise()
    context.state[p.STATE] = ConfigRecord(
        {
            "round-tag": tag,
            "sid": sid,
            "n-sites": n,
            "clip": req.clip,
            "max-weight": req.max_weight,
            "c-key": private_bytes(site.c_key),
            "s-key": private_bytes(site.s_key),
            "self-seed": site.self_seed,
            "me-pk": identity.public,
            "stage": p.DONE_ADVERTISE,
        }
    )
    return AdvertiseReply(
        c_pub,
        s_pub,
        identity.public,
        sign(identity.key, p.advert_payload(context.run_id, tag, sid, c_pub, s_pub)),
        None if examples is None else int(examples),
    ).to_record()


def _refusal_ends_round(stage):
    """A site that refuses a request forgets the round: a coordinator cannot retry with
    another request (e.g. other alive/dropped sets)."""

    @functools.wraps(stage)
    def run(context: Context, *args, **kwargs):
        try:
            return stage(context, *args, **kwargs)
        except SecAggError:
            forget(context)
            raise

    return run


# stage -> the stage a site must have completed of the same round to answer it (advertising starts a round)
_AFTER = {p.SHARE_KEYS: p.DONE_ADVERTISE, p.CONSISTENCY: p.DONE_UPLOAD, p.UNMASK: p.DONE_CONSISTENCY}


@_refusal_ends_round
def check_order(context: Context, stage: str, content) -> None:
    """Before a stage's task (``content``: the message's RecordDict) is read: is a round in
    progress at this site, is the task for that round, and for the stage that comes next?
    First, so that a task for another round or stage is refused as that, whatever else is
    wrong with it; the stage functions check it again on the request they are given."""
    if stage in _AFTER:
        _state(context, StageTask.round_tag(content), _AFTER[stage])


@_refusal_ends_round
def ready_to_train(context: Context, sa: ConfigRecord | SecureTrainRequest) -> None:
    """Before a site spends a round training: is there a secure round, at the right stage, to
    mask the update for? (A site that restarted since key sharing has lost its keys.) And is
    the request one?"""
    _state(context, sa, p.DONE_SHARE)
    _read(sa, SecureTrainRequest)


def _save(context: Context, st: ConfigRecord, site: Site, **changes) -> None:
    """The round's state as it now stands: ``st`` with ``changes`` and the shares ``site`` holds."""
    held = sorted(site.held)
    context.state[p.STATE] = ConfigRecord(
        {
            **dict(st),
            **changes,
            "held-ids": held,
            "held-b": p.ints_to_bytes([site.held[j][0] for j in held]),
            "held-s": p.ints_to_bytes([site.held[j][1] for j in held]),
        }
    )


def _check_peers(context: Context, nodes: list[str], pks: list[bytes], identity: Identity) -> dict[str, bytes]:
    """The published identity keys of this round's neighbours against what this site trusts:
    distinct, not its own, among its pinned keys (if it pins), and the same key for the same
    Flower node as earlier in the run (trust on first use). -> the run's record, updated."""
    if any(not isinstance(k, bytes) for k in pks) or len(set(pks)) != len(pks) or identity.public in pks:
        raise SecAggError("neighbours' identity keys repeat, or repeat this site's own: refused")
    if len(set(nodes)) != len(nodes) or str(context.node_id) in nodes:
        raise SecAggError("neighbours' Flower nodes repeat, or name this site's own: refused")
    if identity.pinned is not None:
        stray = [n for n, k in zip(nodes, pks) if k not in identity.pinned]
        if stray:
            raise SecAggError(
                f"the identity keys published for node(s) {', '.join(stray[:3])} are not among this site's pinned peer keys: refused"
            )
    seen: dict[str, bytes] = {}
    if p.PEERS in context.state:
        rec = context.state[p.PEERS]
        seen = dict(zip(rec["nodes"], rec["keys"]))
    owner = {k: n for n, k in seen.items()}
    for n, k in zip(nodes, pks):
        if n in seen and seen[n] != k:
            raise SecAggError(
                f"the identity key published for node {n} changed during the run (a substituted key?): refused"
            )
        if k in owner and owner[k] != n:
            raise SecAggError(f"the identity key of node {owner[k]} is now published for node {n}: refused")
    return {**seen, **dict(zip(nodes, pks))}


def _round_settings(req: ShareKeysRequest, st: ConfigRecord, n_sites: int) -> tuple[int, int]:
    """The round's Shamir threshold (for ``n_sites`` with this one) and weight cap as the
    coordinator set them, checked against this site's own limits -> (threshold, weight cap)."""
    threshold = req.threshold
    why = check_threshold(threshold, n_sites)
    if why:
        raise SecAggError(f"{why}: refused")
    cap = req.weight_cap
    if not 1 <= cap <= int(st["max-weight"]):
        raise SecAggError(f"weight cap {cap}: expected a whole number in 1..{int(st['max-weight'])}: refused")
    try:
        _quantizer(st, cap)
    except ValueError as e:
        raise SecAggError(f"quantization settings: {e}: refused") from None
    return threshold, cap


@_refusal_ends_round
def share_keys(context: Context, sa: ConfigRecord | ShareKeysRequest, identity: Identity | None = None) -> ConfigRecord:
    """Stage 2: check every neighbour's signed keys against its published identity key, then
    Shamir shares of the self-mask seed and the mask key, one sealed packet per neighbour."""
    identity = identity_for(context, identity)
    st = _state(context, sa, p.DONE_ADVERTISE)
    req = _read(sa, ShareKeysRequest)
    site = _site(st)
    ids = list(req.nbr_ids)
    c_pubs, s_pubs = list(req.nbr_c), list(req.nbr_s)
    sigs, pks, nodes = list(req.nbr_sig), list(req.nbr_pk), list(req.nbr_node)
    if (
        not ids
        or any(len(x) != len(ids) for x in (c_pubs, s_pubs, sigs, pks, nodes))
        or len(set(ids)) != len(ids)
        or site.sid in ids
    ):
        raise SecAggError(
            "neighbour list: expected distinct other sites, each with two public keys, a signature, an identity key and a node: refused"
        )
    mine = set(site.advertise())
    if len(set(c_pubs) | set(s_pubs)) != 2 * len(ids) or mine & (set(c_pubs) | set(s_pubs)):
        raise SecAggError("neighbour keys repeat, or repeat this site's own: refused")
    peers = _check_peers(context, nodes, pks, identity)
    forged = [
        j
        for j, c, s_, sig, pk in zip(ids, c_pubs, s_pubs, sigs, pks)
        if not verify(pk, sig, p.advert_payload(context.run_id, site.round_tag, j, c, s_))
    ]
    if forged:
        raise SecAggError(
            f"the advertised keys of site(s) {forged[:5]} are not signed by their published identity keys (substituted keys?): refused"
        )
    threshold, cap = _round_settings(req, st, len(ids) + 1)
    keys = dict(zip(ids, zip(c_pubs, s_pubs)))
    try:
        sealed = site.share_keys(keys, ids, threshold)
    except ValueError as e:  # a public key that is not a valid X25519 point
        raise SecAggError(f"neighbour key: {e}: refused") from None
    changes = {
        "threshold": threshold,
        "weight-cap": cap,
        "nbr-ids": ids,
        "nbr-c": c_pubs,
        "nbr-s": s_pubs,
        "nbr-pk": pks,
        "stage": p.DONE_SHARE,
    }
    _save(context, st, site, **changes)
    context.state[p.PEERS] = ConfigRecord({"nodes": list(peers), "keys": list(peers.values())})
    to = sorted(sealed)
    return ShareKeysReply(to, [sealed[j] for j in to]).to_record()


@_refusal_ends_round
def masked_input(
    context: Context, sa: ConfigRecord | SecureTrainRequest, flat: np.ndarray, weight: int, seed: int
) -> tuple[np.ndarray, dict]:
    """Stage 3, after training: take the shares sealed to this site; quantize weight x update
    (refused if not finite; each value clipped) with ``weight`` capped at the round's weight cap
    and appended; mask it with the self-mask and a pairwise mask per neighbour that shared keys
    (those that did not are left out). -> (masked uint32 vector of len(flat) + 1, metrics)."""
    st = _state(context, sa, p.DONE_SHARE)
    req = _read(sa, SecureTrainRequest)
    site = _site(st)
    keys = _keys(st)
    senders = list(req.senders)
    sealed = list(req.sealed)
    if len(senders) != len(sealed) or len(set(senders)) != len(senders) or not set(senders) <= set(keys):
        raise SecAggError("forwarded shares: expected at most one from each of this site's neighbours: refused")
    threshold = int(st["threshold"])
    if len(senders) + 1 < threshold:
        raise SecAggError(
            f"only {len(senders)} neighbour(s) shared keys; with this site {threshold} are needed to unmask: refused"
        )
    try:
        site.receive_shares(keys, dict(zip(senders, sealed)))
    except InvalidTag:
        raise SecAggError(
            "a forwarded share does not authenticate (tampered, or sealed for another site or round): refused"
        ) from None
    q = _quantizer(st)
    if weight < 1:
        raise SecAggError("no examples: nothing to contribute")
    used = min(int(weight), q.max_weight)
    flat = np.asarray(flat, dtype=np.float64)
    # Quantizer.encode refuses NaN/Inf before anything is masked.
    code = q.encode(flat, used, np.random.default_rng([seed, int.from_bytes(site.round_tag[:8], "big")]))
    clipped = int(np.count_nonzero(np.abs(flat) > q.clip))
    y = site.masked_input(code, keys, senders)
    _save(context, st, site, stage=p.DONE_UPLOAD)
    return y, {"clipped-values": clipped}


@_refusal_ends_round
def consistency(
    context: Context, sa: ConfigRecord | ConsistencyRequest, identity: Identity | None = None
) -> ConfigRecord:
    """Stage 4: sign the alive set U3 (once per round), if this site is in it and enough of its
    share holders are for an unmasking to be possible."""
    identity = identity_for(context, identity)
    st = _state(context, sa, p.DONE_UPLOAD)
    req = _read(sa, ConsistencyRequest)
    me, n, threshold = int(st["sid"]), int(st["n-sites"]), int(st["threshold"])
    u3 = list(req.alive)
    if len(set(u3)) != len(u3) or not all(1 <= j <= n for j in u3):
        raise SecAggError(f"alive set: expected distinct site numbers in 1..{n}: refused")
    if me not in u3:
        raise SecAggError("alive set leaves out this site, which uploaded: refused")
    holders = set(u3) & (_senders(st) | {me})
    if len(holders) < threshold:
        raise SecAggError(
            f"alive set holds {len(holders)} of this site's share holders, fewer than the threshold {threshold}: refused"
        )
    context.state[p.STATE] = ConfigRecord({**dict(st), "u3": sorted(u3), "stage": p.DONE_CONSISTENCY})
    return ConsistencyReply(sign(identity.key, p.alive_payload(context.run_id, _tag(req), u3))).to_record()


@_refusal_ends_round
def unmask(context: Context, sa: ConfigRecord | UnmaskRequest) -> ConfigRecord:
    """Stage 5: answer one unmask request, if it names the alive set this site signed, carries
    at least ``threshold`` valid signatures on that set from this site's share holders, and is
    this site's own view of it; then forget this round's secrets (a second request finds nothing)."""
    st = _state(context, sa, p.DONE_CONSISTENCY)
    del context.state[p.STATE]  # answered once at most, whatever happens next
    req = _read(sa, UnmaskRequest)
    me, threshold, senders = int(st["sid"]), int(st["threshold"]), _senders(st)
    u3 = sorted(set(req.u3))
    if u3 != [int(j) for j in st["u3"]]:
        raise SecAggError("unmask request for another alive set than the one this site signed: refused")
    pk_of = {int(j): k for j, k in zip(st["nbr-ids"], st["nbr-pk"])} | {me: st["me-pk"]}
    signers, sigs = list(req.sig_ids), list(req.sigs)
    holders = set(u3) & (senders | {me})
    if len(signers) != len(sigs) or len(set(signers)) != len(signers) or not set(signers) <= holders:
        raise SecAggError(
            "consistency signatures: expected at most one from each of this site's share holders in the alive set: refused"
        )
    payload = p.alive_payload(context.run_id, _tag(req), u3)
    bad = [j for j, sig in zip(signers, sigs) if not verify(pk_of[j], sig, payload)]
    if bad:
        raise SecAggError(f"the signatures of site(s) {bad[:5]} on the alive set do not verify: refused")
    if len(signers) < threshold:
        raise SecAggError(
            f"only {len(signers)} of this site's share holders signed the alive set, {threshold} needed: refused"
        )
    alive, dropped = list(req.alive), list(req.dropped)
    check_unmask_request(alive, dropped, threshold, me, senders)  # refuses strangers, overlaps, short requests
    if (sorted(alive), sorted(dropped)) != unmask_view(u3, senders, me):
        raise SecAggError(
            "unmask request: the alive and dropped sites are not this site's view of the alive set it signed: refused"
        )
    shares = _site(st).unmask(alive, dropped, threshold)
    self_ids, pair_ids = sorted(shares["self_seed"]), sorted(shares["pair_key"])
    return UnmaskReply(
        self_ids,
        p.ints_to_bytes([shares["self_seed"][j] for j in self_ids]),
        pair_ids,
        p.ints_to_bytes([shares["pair_key"][j] for j in pair_ids]),
    ).to_record()


def forget(context: Context) -> None:
    """End this site's part in the round: its secrets go (the run's peer keys stay)."""
    if p.STATE in context.state:
        del context.state[p.STATE]
