"""A site's side of a secure round (SecAgg+; the message flow is in
:mod:`fedtune.common.secagg.protocol`).

Each function takes the coordinator's ``secagg`` record and the site's Flower context, checks
that the request is in order and safe, and returns the record (or, after training, the masked
vector) to answer with. Anything out of order or unsafe raises :class:`SecAggError`; the caller answers
``refused`` with the reason. The site's secrets (two X25519 private keys, its self-mask seed,
the shares it holds) live only in ``context.state`` and are wiped when the round ends; its
update goes from training straight to masking and is never stored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context

from fedtune.common.secagg import Quantizer, SecAggError, Site, check_threshold, private_bytes
from fedtune.common.secagg import protocol as p


def flatten_update(delta: Mapping[str, object], reference: Mapping[str, object]) -> np.ndarray:
    """The update as one float64 vector in the order of ``reference`` (the global adapter the
    coordinator sent), after checking it has exactly the reference's tensors and shapes."""
    if set(delta) != set(reference):
        missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
        raise SecAggError(f"update does not match the global adapter (missing {missing[:2]}, unexpected {extra[:2]}): refused before masking")
    parts = []
    for name, ref in reference.items():
        a = np.asarray(delta[name], dtype=np.float64)
        if tuple(a.shape) != tuple(ref.shape):
            raise SecAggError(f"update tensor {name}: shape {tuple(a.shape)}, expected {tuple(ref.shape)}: refused before masking")
        parts.append(a.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def _tag(sa: ConfigRecord) -> bytes:
    tag = sa.get("round-tag")
    if not isinstance(tag, bytes) or len(tag) != p.TAG_BYTES:
        raise SecAggError(f"round tag: expected {p.TAG_BYTES} bytes")
    return tag


def _state(context: Context, sa: ConfigRecord, stage_done: int) -> ConfigRecord:
    """This round's saved state, when the site completed ``stage_done`` of the same round."""
    if p.STATE not in context.state:
        raise SecAggError("no secure round in progress at this site (it restarted, or the round ended): refused")
    st = context.state[p.STATE]
    if st["round-tag"] != _tag(sa):
        raise SecAggError("request for another round than the one in progress: refused")
    if int(st["stage"]) != stage_done:
        raise SecAggError(f"request out of order (this site completed stage {int(st['stage'])}, the request needs stage {stage_done}): refused")
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


def _quantizer(st: ConfigRecord) -> Quantizer:
    return Quantizer(float(st["clip"]), int(st["max-weight"]), int(st["n-sites"]))


def advertise(context: Context, sa: ConfigRecord) -> ConfigRecord:
    """Stage 1: draw this round's two X25519 key pairs and self-mask seed, keep them here
    with the round's quantization settings; answer with the two public keys."""
    forget(context)  # whatever an earlier, unfinished round left
    tag, sid, n = _tag(sa), int(sa["sid"]), int(sa["n-sites"])
    if not 1 <= sid <= n or n < 2:
        raise SecAggError(f"site number {sid} of {n}: expected 1..n with n >= 2")
    try:
        _quantizer(sa)
    except ValueError as e:
        raise SecAggError(f"quantization settings: {e}: refused") from None
    site = Site(sid, tag)
    context.state[p.STATE] = ConfigRecord(
        {
            "round-tag": tag,
            "sid": sid,
            "n-sites": n,
            "clip": float(sa["clip"]),
            "max-weight": int(sa["max-weight"]),
            "c-key": private_bytes(site.c_key),
            "s-key": private_bytes(site.s_key),
            "self-seed": site.self_seed,
            "stage": p.DONE_ADVERTISE,
        }
    )
    c_pub, s_pub = site.advertise()
    return ConfigRecord({"c-pub": c_pub, "s-pub": s_pub})


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


@_refusal_ends_round
def ready_to_train(context: Context, sa: ConfigRecord) -> None:
    """Before a site spends a round training: is there a secure round, at the right stage, to
    mask the update for? (A site that restarted since key sharing has lost its keys.)"""
    _state(context, sa, p.DONE_SHARE)


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


@_refusal_ends_round
def share_keys(context: Context, sa: ConfigRecord) -> ConfigRecord:
    """Stage 2: Shamir shares of the self-mask seed and the mask key, one sealed packet per neighbour."""
    st = _state(context, sa, p.DONE_ADVERTISE)
    site = _site(st)
    ids = [int(j) for j in sa["nbr-ids"]]
    c_pubs, s_pubs = list(sa["nbr-c"]), list(sa["nbr-s"])
    if not ids or len(ids) != len(c_pubs) or len(ids) != len(s_pubs) or len(set(ids)) != len(ids) or site.sid in ids:
        raise SecAggError("neighbour list: expected distinct other sites, each with two public keys: refused")
    mine = set(site.advertise())
    if len(set(c_pubs) | set(s_pubs)) != 2 * len(ids) or mine & (set(c_pubs) | set(s_pubs)):
        raise SecAggError("neighbour keys repeat, or repeat this site's own: refused")
    threshold = int(sa["threshold"])
    why = check_threshold(threshold, len(ids) + 1)
    if why:
        raise SecAggError(f"{why}: refused")
    keys = dict(zip(ids, zip(c_pubs, s_pubs)))
    try:
        sealed = site.share_keys(keys, ids, threshold)
    except ValueError as e:  # a public key that is not a valid X25519 point
        raise SecAggError(f"neighbour key: {e}: refused") from None
    _save(context, st, site, **{"threshold": threshold, "nbr-ids": ids, "nbr-c": c_pubs, "nbr-s": s_pubs, "stage": p.DONE_SHARE})
    to = sorted(sealed)
    return ConfigRecord({"to": to, "sealed": [sealed[j] for j in to]})


@_refusal_ends_round
def masked_input(context: Context, sa: ConfigRecord, flat: np.ndarray, weight: int, seed: int) -> tuple[np.ndarray, dict]:
    """Stage 3, after training: take the shares sealed to this site; quantize the update
    (refused if not finite; each value clipped; the weight, capped at max-weight, folded in);
    mask it with the self-mask and a pairwise mask per neighbour that shared keys (those that
    did not are left out). -> (masked uint32 vector, metrics: values clipped, weight used)."""
    st = _state(context, sa, p.DONE_SHARE)
    site = _site(st)
    keys = _keys(st)
    senders = [int(j) for j in sa["from"]]
    sealed = list(sa["sealed"])
    if len(senders) != len(sealed) or len(set(senders)) != len(senders) or not set(senders) <= set(keys):
        raise SecAggError("forwarded shares: expected at most one from each of this site's neighbours: refused")
    threshold = int(st["threshold"])
    if len(senders) + 1 < threshold:
        raise SecAggError(f"only {len(senders)} neighbour(s) shared keys; with this site {threshold} are needed to unmask: refused")
    try:
        site.receive_shares(keys, dict(zip(senders, sealed)))
    except InvalidTag:
        raise SecAggError("a forwarded share does not authenticate (tampered, or sealed for another site or round): refused") from None
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
    return y, {"clipped-values": clipped, "secagg-weight": used}


@_refusal_ends_round
def unmask(context: Context, sa: ConfigRecord) -> ConfigRecord:
    """Stage 4: answer one unmask request, if it is safe, then forget this round's secrets
    (a second request for the round finds nothing)."""
    st = _state(context, sa, p.DONE_UPLOAD)
    alive, dropped = [int(j) for j in sa["alive"]], [int(j) for j in sa["dropped"]]
    del context.state[p.STATE]  # answered once at most, whatever happens next
    site = _site(st)
    if site.sid not in alive:
        raise SecAggError("unmask request lists this site, which uploaded, as not alive: refused")
    shares = site.unmask(alive, dropped, int(st["threshold"]))  # refuses overlapping or short requests
    self_ids, pair_ids = sorted(shares["self_seed"]), sorted(shares["pair_key"])
    return ConfigRecord(
        {
            "self-ids": self_ids,
            "self-shares": p.ints_to_bytes([shares["self_seed"][j] for j in self_ids]),
            "pair-ids": pair_ids,
            "pair-shares": p.ints_to_bytes([shares["pair_key"][j] for j in pair_ids]),
        }
    )


def forget(context: Context) -> None:
    if p.STATE in context.state:
        del context.state[p.STATE]
