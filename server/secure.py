"""The coordinator's side of a secure round (SecAgg+ with signed keys and a signed consistency
check; the message flow is in :mod:`fedtune.common.secagg.protocol`).

The coordinator never holds one site's update: it relays signed public keys and sealed
shares, adds masked vectors into one running mod-2^32 sum as they arrive, collects the
survivors' signatures on the alive set, and with the survivors' shares removes the masks from
that sum only. What comes out is the weighted mean of the summed sites' updates (a flat
vector in the global adapter's order): the unmasked sum of weight x update divided by the
unmasked sum of the weights the sites encoded beside it, each at most the round's weight cap
(secure_aggregation.max_weight, federation.weight_cap x the median reported example count;
1 under federation.weighting "equal" or DP), off by at most the stated quantization bound.

``site_keys``: the registered identity keys (ftserver's --authorized-keys; ftsim's keys for
its virtual sites). A site whose advertisement is not signed by a registered key, or by a key
another site of the round already uses, is dropped; without ``site_keys`` the keys the sites
present are published as they are. Honest sites check the signatures themselves: this is the
coordinator keeping a bad site from aborting the round, not the defence.

Each stage has a deadline; a site that misses one is a dropout. Below ``threshold`` (or
``federation.min_sites``) survivors at any stage, the round aborts and nothing is released.

Layout, in the configure/aggregate shape of a Flower strategy: :class:`SecureRound` is what the
round fixes before its first message (and the ledger of timings, dropouts and refusals); each
stage X has ``configure_X`` (one site's message, from the stage's input state), ``aggregate_X``
(one reply, checked into the stage's output state, as it arrives: no reply is kept) and
``X_stage`` (the exchange, then the survivors check). The checks a hostile site meets are plain
functions (:func:`advert_problem`, :func:`parse_shares`, :func:`alive_signature_ok`,
:func:`unmask_request`, :func:`parse_unmask_answer`, :func:`require_survivors`, the weight
checks in :func:`unmask_mean`); :func:`secure_mean` only chains the stages. Every request is
built, and every reply read (keys, types, sizes), by its class in :mod:`fedtune.common.messages`;
a reply that is not its stage's is that site's dropout, with the reason recorded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.common import privacy
from fedtune.common.config import FedTuneConfig
from fedtune.common.messages import (
    CONFIG,
    DP_POPULATION_KEY,
    SECAGG,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyRequest,
    MessageError,
    SecureTrainRequest,
    ShareKeysReply,
    ShareKeysRequest,
    StageReply,
    StageTask,
    TrainReply,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.common.secagg import (
    Quantizer,
    SecAggError,
    check_threshold,
    load_public,
    neighbours,
    round_threshold,
    round_weight_cap,
    unmask_sum,
    unmask_view,
    verify,
)
from fedtune.common.secagg import protocol as p

from .messaging import FederationError, Printer, clean, exchange, site_of, site_reason


class KeyFolder:
    """The registered sites' identity keys: every ``*.pub`` in ftserver's --authorized-keys
    folder, read afresh each time the set is asked for (a site key dropped into the folder while
    the server runs is registered with the SuperLink within seconds, and published here from
    the next round on). A file that is not a P-384 public key is left out (ftserver says why)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __iter__(self):
        keys = set()
        for f in sorted(self.folder.glob("*.pub")):
            try:
                keys.add(load_public(f.read_bytes()))
            except (OSError, ValueError):
                continue
        return iter(keys)

    @classmethod
    def of_run(cls, out: Path) -> "KeyFolder | None":
        """The folder ftserver names in the run's ``server.json``, or None (no site authentication)."""
        try:
            folder = json.loads((Path(out) / "server.json").read_text()).get("authorized_keys")
        except (OSError, ValueError):
            return None
        return cls(folder) if folder else None


@dataclass
class SecureOutcome:
    mean: np.ndarray  # float64, the weighted mean of the summed sites' updates
    summed: dict[str, int]  # the sites summed -> the bytes each uploaded
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The round's fixed part, and the ledger every stage writes to


@dataclass
class SecureRound:
    """What a secure round fixes before its first message (read by every stage), and its ledger:
    each stage's seconds, the sites it dropped, and why the coordinator itself refused a site."""

    rnd: int
    tag: bytes  # fresh per round: binds keys, shares, masks and signatures to this round
    sid_of: dict[int, int]  # Flower node -> the site's number in the round (1..n, a Shamir x)
    names: dict  # node -> the site's recorded name (messaging.site_of keeps it)
    say: Printer
    content: RecordDict  # what a plain TRAIN message carries
    length: int  # values in the flat update (the masked vector has one more: the weight)
    clip: float
    by_examples: bool  # weights are example counts (else every site weighs 1)
    registered: set[bytes] | None  # the registered identity keys, or None (published as presented)
    k_invited: int  # neighbours each invited site has
    threshold: int  # fixed by the sites invited, so dropouts can only abort a round, never ease unmasking
    min_sites: int
    max_examples: int
    max_weight: int
    weight_cap: float | None
    stage_timeout_s: float
    round_timeout_s: float
    timings: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    node_of: dict[int, int] = field(init=False)  # sid -> Flower node

    def __post_init__(self) -> None:
        self.node_of = {i: n for n, i in self.sid_of.items()}

    def name(self, sid: int) -> str:
        return self.names.get(self.node_of[sid], f"node-{self.node_of[sid]}")


def round_threshold_or_abort(threshold: int | None, nbrs: int | None, n_invited: int, rnd: int) -> tuple[int, int]:
    """-> (neighbours each invited site has, the round's threshold); FederationError, before
    anything is sent, when that threshold is unsafe or unusable for the share holders."""
    k_invited, t = round_threshold(threshold, nbrs, n_invited)
    why = check_threshold(t, k_invited + 1)
    if why:
        raise FederationError(
            f"round {rnd}: secure aggregation cannot start: secure_aggregation.{why} "
            f"({n_invited} site(s) invited, each with {k_invited} neighbour(s)); nothing was sent"
        )
    return k_invited, t


def open_round(
    cfg: FedTuneConfig,
    nodes: list[int],
    content: RecordDict,
    rnd: int,
    length: int,
    names: dict,
    say: Printer,
    site_keys: Collection[bytes] | None,
) -> SecureRound:
    """The round's fixed part from the config and the invited ``nodes``; FederationError when
    its threshold is unsafe (nothing sent)."""
    sa, fed = cfg.secure_aggregation, cfg.federation
    clip = cfg.secure_clip
    if cfg.privacy.enabled:  # the values are clipped updates plus each site's noise: cover both
        clip = privacy.quantizer_clip(cfg, int(content["config"][DP_POPULATION_KEY]))
    k_invited, t = round_threshold_or_abort(sa.threshold, sa.neighbours, len(nodes), rnd)
    return SecureRound(
        rnd=rnd,
        tag=os.urandom(p.TAG_BYTES),
        sid_of={n: i + 1 for i, n in enumerate(sorted(nodes))},
        names=names,
        say=say,
        content=content,
        length=length,
        clip=clip,
        by_examples=fed.weighting == "examples" and not cfg.privacy.enabled,
        registered=None if site_keys is None else set(site_keys),
        k_invited=k_invited,
        threshold=t,
        min_sites=fed.min_sites,
        max_examples=fed.max_examples_per_update,
        max_weight=sa.max_weight,
        weight_cap=fed.weight_cap,
        stage_timeout_s=sa.stage_timeout_s,
        round_timeout_s=fed.round_timeout_s,
    )


def require_survivors(alive: Collection[int], stage: str, t: int, min_sites: int, rnd: int) -> None:
    """FederationError (the round aborts, nothing released) when fewer than max(t, min_sites, 2) are left."""
    if len(alive) < max(t, min_sites, 2):
        raise FederationError(
            f"round {rnd}: secure aggregation aborted at {stage}: {len(alive)} site(s) left, "
            f"{max(t, min_sites, 2)} needed (secure_aggregation.threshold {t}, federation.min_sites {min_sites}); "
            f"nothing was unmasked or released. The global adapter stays at round {rnd - 1}; the run can be resumed."
        )


def _require(r: SecureRound, alive: Collection[int], stage: str) -> None:
    require_survivors(alive, stage, r.threshold, r.min_sites, r.rnd)


def run_stage(
    grid: Grid,
    r: SecureRound,
    kind: str,
    label: str,
    targets: list[int],
    build: Callable[[int], RecordDict],
    read: Callable[[Message, int, int], None],
    timeout: float,
    kept: Collection[int],
) -> None:
    """One exchange with the sites ``targets`` (by sid): ``build(sid)`` is each one's message,
    ``read(m, node, sid)`` checks each reply into the stage's state, and ``kept`` (a container
    the reads fill) holds the sites it left in the round. Dropouts are named at once, with the
    reason a site or the coordinator gave."""
    t0 = time.time()

    def seen(m: Message, n: int) -> None:
        if not m.has_error() and kind != MessageType.TRAIN:
            who, status = site_of(m, n, r.names)
            if status != "ok":  # the site's reason, read as every site string is (messaging.site_reason)
                r.refused[who] = f"{status}: {site_reason(m, status)}"
        read(m, n, r.sid_of[n])

    exchange(grid, [r.node_of[i] for i in targets], lambda n: build(r.sid_of[n]), kind, timeout, seen)
    r.timings[label] = round(time.time() - t0, 3)
    gone = set(targets) - set(kept)
    r.dropped[label] = sorted(r.name(i) for i in gone)
    if r.dropped[label]:
        why = "; ".join(f"{r.name(i)}: {r.refused[r.name(i)]}" for i in gone if r.name(i) in r.refused)
        r.say(
            f"round {r.rnd} secure | {label}: {len(targets) - len(r.dropped[label])} of {len(targets)} site(s) went on; "
            f"dropped: {', '.join(r.dropped[label])}" + (f" ({why})" if why else "")
        )


def _answered(m: Message, node: int, names: dict) -> bool:
    """Whether the site answered (no Flower error) with status ok."""
    return not m.has_error() and site_of(m, node, names)[1] == "ok"


def _malformed(r: SecureRound, sid: int, e: MessageError) -> None:
    r.refused[r.name(sid)] = f"malformed reply: {clean(str(e))}"


def _stage_reply(r: SecureRound, stage: str, m: Message, node: int, sid: int):
    """The stage's typed reply (:mod:`fedtune.common.messages`) of a site that answered ok, or
    None: an error, another status, or a reply that is not the stage's (keys, types, sizes; the
    coordinator says why)."""
    if not _answered(m, node, r.names):
        return None
    try:
        return StageReply.from_record(m.content, stage).reply
    except MessageError as e:
        _malformed(r, sid, e)
        return None


# ---------------------------------------------------------------------------------------------
# Stage 1: train.advertise. Each site answers with two X25519 public keys signed by its identity
# key (and, weighting by examples, its example count).


@dataclass
class Advert:
    """One site's key advertisement as it arrived (read by AdvertiseReply; not yet checked)."""

    c_pub: bytes  # X25519, 32 bytes
    s_pub: bytes
    identity: bytes  # the identity public key it signs with (SEC1 P-384), as sent
    sig: bytes
    examples: int | None
    run_id: int  # the Flower run it answered in


@dataclass
class Advertised:
    """Stage 1's outcome, by sid: the accepted sites' X25519 keys, (identity key, signature),
    example counts (1 each unless weighting by examples) and Flower run."""

    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    signed: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    run_of: dict[int, int] = field(default_factory=dict)


def configure_advertise(r: SecureRound, sid: int) -> RecordDict:
    req = AdvertiseRequest(r.tag, sid, len(r.sid_of), r.clip, r.max_weight)
    return StageTask(req, config_record=r.content[CONFIG]).to_record()  # the round's config, forwarded as it is


def parse_advert(reply: AdvertiseReply, run_id: int) -> Advert | None:
    """A site's advertisement (from Flower run ``run_id``), or None when its two public keys are
    not 32 bytes each."""
    c, s_ = reply.c_pub, reply.s_pub
    if not (isinstance(c, bytes) and isinstance(s_, bytes) and len(c) == len(s_) == 32):
        return None
    return Advert(c, s_, reply.signer, reply.sig, reply.examples, run_id)


def advert_problem(
    adv: Advert,
    tag: bytes,
    sid: int,
    registered: Collection[bytes] | None,
    taken: Collection[bytes],
    by_examples: bool,
    max_examples: int,
) -> str | None:
    """Why the coordinator drops a site's advertisement, or None: an identity key that is not
    registered (``registered``, when there is a registry), one another site of the round already
    signs with (``taken``), no valid signature over its keys for this run, round and sid, or
    (``by_examples``) an example count outside 1..max_examples."""
    if registered is not None and adv.identity not in registered:
        return "its advertisement is not signed by a registered site key"
    if any(adv.identity == other for other in taken):
        return "it signs with another site's key"
    if not verify(adv.identity, adv.sig, p.advert_payload(adv.run_id, tag, sid, adv.c_pub, adv.s_pub)):
        return "its advertised keys carry no valid signature"
    n_ex = adv.examples
    if by_examples and not (isinstance(n_ex, int) and 1 <= n_ex <= max_examples):
        return f"example count {n_ex!r}: expected 1..{max_examples} (federation.max_examples_per_update)"
    return None


def aggregate_advertise(r: SecureRound, st: Advertised, m: Message, node: int, sid: int) -> None:
    reply = _stage_reply(r, p.ADVERTISE, m, node, sid)
    if reply is None:
        return
    adv = parse_advert(reply, m.metadata.run_id)
    if adv is None:
        return
    taken = [identity for identity, _ in st.signed.values()]
    why = advert_problem(adv, r.tag, sid, r.registered, taken, r.by_examples, r.max_examples)
    if why:
        r.refused[r.name(sid)] = why
        return
    st.keys[sid], st.signed[sid], st.run_of[sid] = (adv.c_pub, adv.s_pub), (adv.identity, adv.sig), adv.run_id
    st.counts[sid] = int(adv.examples) if r.by_examples else 1


def advertise_stage(grid: Grid, r: SecureRound) -> tuple[Advertised, Neighbourhood]:
    """Stage 1 with every invited site; -> the accepted advertisements and what their senders fix."""
    st = Advertised()
    build, read = partial(configure_advertise, r), partial(aggregate_advertise, r, st)
    run_stage(grid, r, p.ADVERTISE, "advertise", sorted(r.node_of), build, read, r.stage_timeout_s, st.keys)
    return st, plan_neighbourhood(r, st)


@dataclass
class Neighbourhood:
    """What stage 1's survivors fix: U1, each one's neighbours (k of them), the round's weight
    cap and the quantizer the sites encode with."""

    u1: set[int]
    k: int
    nbrs: dict[int, list[int]]
    cap: int
    q: Quantizer


def plan_neighbourhood(r: SecureRound, st: Advertised) -> Neighbourhood:
    u1 = set(st.keys)
    _require(r, u1, "key advertisement")
    # Still t share holders each: k + 1 = min(k_invited + 1, |u1|), both checked >= t above.
    k = min(r.k_invited, len(u1) - 1)
    cap = round_weight_cap(st.counts.values(), r.weight_cap, r.max_weight) if r.by_examples else 1
    return Neighbourhood(u1, k, neighbours(sorted(u1), k), cap, Quantizer(r.clip, cap, len(r.sid_of)))


# ---------------------------------------------------------------------------------------------
# Stage 2: train.share_keys. Each site gets its neighbours' signed keys and published identity
# keys, and answers with its shares sealed to each neighbour.


@dataclass
class Shared:
    """Stage 2's outcome: sid -> {neighbour: the share sealed to it}; after the stage, each
    survivor's senders (its neighbours that shared keys too, whose shares it gets)."""

    outbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    senders: dict[int, list[int]] = field(default_factory=dict)


def configure_share_keys(r: SecureRound, adv: Advertised, nb: Neighbourhood, sid: int) -> RecordDict:
    req = ShareKeysRequest.build(r.tag, r.threshold, nb.cap, nb.nbrs[sid], adv.keys, adv.signed, r.node_of)
    return StageTask(req).to_record()


def parse_shares(reply: ShareKeysReply, expected: list[int]) -> dict[int, bytes] | None:
    """neighbour -> sealed share from a site's reply, or None unless it holds one share for each
    of ``expected`` (the site's neighbours) and no other."""
    to, sealed = list(reply.to), list(reply.sealed)
    if sorted(to) == expected and len(sealed) == len(to):
        return dict(zip(to, sealed))
    return None


def aggregate_share_keys(r: SecureRound, nb: Neighbourhood, st: Shared, m: Message, node: int, sid: int) -> None:
    reply = _stage_reply(r, p.SHARE_KEYS, m, node, sid)
    shares = None if reply is None else parse_shares(reply, nb.nbrs[sid])
    if shares is not None:
        st.outbox[sid] = shares


def plan_senders(r: SecureRound, nb: Neighbourhood, st: Shared) -> None:
    u2 = set(st.outbox)
    _require(r, u2, "key sharing")
    st.senders = {i: [j for j in nb.nbrs[i] if j in u2] for i in u2}


def share_keys_stage(grid: Grid, r: SecureRound, adv: Advertised, nb: Neighbourhood) -> Shared:
    """Stage 2 with U1; -> the shares each survivor (U2) sent, and each one's senders."""
    st = Shared()
    build, read = partial(configure_share_keys, r, adv, nb), partial(aggregate_share_keys, r, nb, st)
    run_stage(grid, r, p.SHARE_KEYS, "share_keys", sorted(nb.u1), build, read, r.stage_timeout_s, st.outbox)
    plan_senders(r, nb, st)
    return st


# ---------------------------------------------------------------------------------------------
# Stage 3: train. The plain TRAIN message plus the shares sealed to the site; each masked vector
# is added into one running sum as it arrives, never kept.


@dataclass
class MaskedSum:
    total: np.ndarray  # uint32, the values then the weight, summed mod 2^32
    u3: set[int] = field(default_factory=set)  # the sites summed
    uploaded: dict[int, int] = field(default_factory=dict)  # sid -> bytes of its masked vector
    clipped: int = 0  # values the sites report they clipped


def configure_train(r: SecureRound, sh: Shared, sid: int) -> RecordDict:
    senders = sh.senders[sid]
    req = SecureTrainRequest(r.tag, senders, [sh.outbox[j][sid] for j in senders])
    return RecordDict({**dict(r.content.items()), SECAGG: req.to_record()})


def aggregate_train(r: SecureRound, acc: MaskedSum, on_trained, m: Message, node: int, sid: int) -> None:
    on_trained(m, node)
    if not _answered(m, node, r.names):
        return
    try:  # the metrics as the coordinator's tolerant readers take them: unknown keys dropped
        reply = TrainReply.from_record(m.content, masked_length=r.length + 1, strict=False)
    except MessageError as e:
        _malformed(r, sid, e)
        return
    if reply.masked is None:  # a plain update, or none, in a secure round: not summed
        return
    acc.total += reply.masked
    acc.u3.add(sid)
    acc.clipped += int(reply.metrics.clipped_values or 0)
    acc.uploaded[sid] = int(reply.update_bytes)


def train_stage(grid: Grid, r: SecureRound, sh: Shared, on_trained) -> MaskedSum:
    """Stage 3 with U2; -> the running sum of the masked vectors of U3 (the sites summed)."""
    acc = MaskedSum(np.zeros(r.length + 1, dtype=np.uint32))
    build, read = partial(configure_train, r, sh), partial(aggregate_train, r, acc, on_trained)
    run_stage(grid, r, MessageType.TRAIN, "train", sorted(sh.outbox), build, read, r.round_timeout_s, acc.u3)
    _require(r, acc.u3, "masked upload (after training)")
    return acc


# ---------------------------------------------------------------------------------------------
# Stage 4: train.consistency. Every survivor signs the alive set U3.


def configure_consistency(r: SecureRound, alive: list[int], sid: int) -> RecordDict:
    return StageTask(ConsistencyRequest(r.tag, alive)).to_record()


def alive_signature_ok(identity: bytes, sig: object, run_id: int, tag: bytes, alive: list[int]) -> bool:
    """Whether ``sig`` is the site's (its advertised identity key) over this run's and round's U3."""
    return verify(identity, sig, p.alive_payload(run_id, tag, alive))


def aggregate_consistency(
    r: SecureRound, adv: Advertised, alive: list[int], sigs: dict[int, bytes], m: Message, node: int, sid: int
) -> None:
    reply = _stage_reply(r, p.CONSISTENCY, m, node, sid)
    if reply is None:
        return
    if alive_signature_ok(adv.signed[sid][0], reply.sig, adv.run_of[sid], r.tag, alive):
        sigs[sid] = reply.sig
    else:
        r.refused[r.name(sid)] = "its signature on the alive set does not verify"


def consistency_stage(grid: Grid, r: SecureRound, adv: Advertised, acc: MaskedSum) -> dict[int, bytes]:
    """Stage 4 with U3; -> sid -> its valid signature on U3 (the signers are U4)."""
    alive, sigs = sorted(acc.u3), {}
    build, read = partial(configure_consistency, r, alive), partial(aggregate_consistency, r, adv, alive, sigs)
    run_stage(grid, r, p.CONSISTENCY, "consistency", alive, build, read, r.stage_timeout_s, sigs)
    _require(r, sigs, "the consistency check")
    return sigs


# ---------------------------------------------------------------------------------------------
# Stage 5: train.unmask. Each survivor gets its own view of U3 and its share holders' signatures
# on U3, and answers with the shares that remove the masks.


def unmask_request(
    tag: bytes, u3: Collection[int], senders: list[int], sid: int, sigs: dict[int, bytes]
) -> UnmaskRequest:
    """What site ``sid`` is asked at unmasking: U3, its own view of it (its share holders in U3,
    the senders not in U3) and the U3 signatures of those of its share holders that signed."""
    mine, gone = unmask_view(u3, senders, sid)
    signers = sorted(set(sigs) & (set(senders) | {sid}))
    return UnmaskRequest(tag, sorted(u3), mine, gone, signers, [sigs[j] for j in signers])


def configure_unmask(r: SecureRound, sh: Shared, acc: MaskedSum, sigs: dict[int, bytes], sid: int) -> RecordDict:
    return StageTask(unmask_request(r.tag, acc.u3, sh.senders[sid], sid, sigs)).to_record()


def parse_unmask_answer(reply: UnmaskReply) -> dict[str, dict[int, int]]:
    """{"self_seed": {owner: share}, "pair_key": {owner: share}} from a site's answer;
    MessageError when its ids and shares differ in length."""
    return reply.shares()


def aggregate_unmask(r: SecureRound, answers: dict, m: Message, node: int, sid: int) -> None:
    reply = _stage_reply(r, p.UNMASK, m, node, sid)
    if reply is None:
        return
    try:
        answers[sid] = parse_unmask_answer(reply)
    except MessageError as e:
        _malformed(r, sid, e)


def unmask_stage(grid: Grid, r: SecureRound, sh: Shared, acc: MaskedSum, sigs: dict[int, bytes]) -> dict:
    """Stage 5 with U4; -> sid -> its answer (the shares it revealed). Too few answers abort in
    :func:`unmask_mean`."""
    answers: dict[int, dict[str, dict[int, int]]] = {}
    build, read = partial(configure_unmask, r, sh, acc, sigs), partial(aggregate_unmask, r, answers)
    run_stage(grid, r, p.UNMASK, "unmask", sorted(sigs), build, read, r.stage_timeout_s, answers)
    return answers


# ---------------------------------------------------------------------------------------------
# Stage 6: the masks removed from the sum, the mean decoded, and the round's record.


def unmask_mean(
    r: SecureRound, adv: Advertised, nb: Neighbourhood, sh: Shared, acc: MaskedSum, answers: dict
) -> tuple[np.ndarray, int]:
    """-> (the weighted mean, the summed weight the sites encoded). FederationError when too few
    answered or the unmasked sum is not one of updates and weights: nothing is released."""
    try:
        _require(r, answers, "unmasking")
        t0 = time.time()
        total = unmask_sum(acc.total, acc.u3, adv.keys, set(sh.outbox), nb.nbrs, answers, r.threshold, r.tag)
        mean, weight = nb.q.decode(total, len(acc.u3))  # refuses a sum that is not of updates and weights
        r.timings["unmask_compute"] = round(time.time() - t0, 3)
    except SecAggError as e:
        raise FederationError(f"round {r.rnd}: secure aggregation aborted, nothing released: {e}") from None
    return mean, weight


def reported_weight(counts: dict[int, int], summed: Collection[int], cap: int) -> int:
    """The weight the summed sites reported: their example counts, each capped at the round's cap."""
    return sum(min(counts[i], cap) for i in summed)


def round_stats(
    r: SecureRound, stages: list[int], nb: Neighbourhood, acc: MaskedSum, weight: int, reported: int
) -> dict:
    """The round's ``secure_aggregation`` record (metrics.json); ``stages``: sites at each stage."""
    stats = {
        "secure": True,
        "threshold": r.threshold,
        "neighbours": nb.k,
        "sites_per_stage": stages,
        "dropped": {k_: v for k_, v in r.dropped.items() if v},
        "summed_weight": weight,
        "reported_weight": reported,
        "weight_cap": nb.cap,
        "identity_keys": "registered" if r.registered is not None else "as presented (no registry)",
        "clip": nb.q.clip,
        "clipped_values": acc.clipped,
        "quantization_error_bound": nb.q.mean_error_bound(weight, len(acc.u3)),
        "upload_bytes_per_param": round(max(acc.uploaded.values()) / max(r.length, 1), 4),
        "stage_seconds": r.timings,
    }
    if r.refused:
        stats["refused_by_coordinator"] = dict(r.refused)
    return stats


def warn_weights(r: SecureRound, nb: Neighbourhood, acc: MaskedSum, weight: int, reported: int) -> None:
    """Say when the encoded weight differs from the reported one, and when sites clipped values."""
    if weight != reported:
        r.say(
            f"round {r.rnd} secure | the summed sites encoded a total weight of {weight}, but reported {reported} "
            f"(their example counts, capped at {nb.cap}): a site encodes another weight than it reports. "
            f"The mean divides by {weight}, what was encoded; no site weighs more than {nb.cap}."
        )
    if acc.clipped:
        r.say(
            f"round {r.rnd} secure | {acc.clipped:,} update value(s) exceeded secure_aggregation.clip {nb.q.clip:g} "
            "and were clipped; raise the clip if this recurs"
        )


# ---------------------------------------------------------------------------------------------
# The driver


def secure_mean(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    cfg: FedTuneConfig,
    rnd: int,
    length: int,
    on_trained,
    names: dict,
    say: Printer,
    site_keys: Collection[bytes] | None = None,
) -> SecureOutcome:
    """Run stages 1-5 with ``nodes``. ``content``: what a plain TRAIN message carries;
    ``length``: values in the flat update; ``on_trained(m, node)``: records a training reply's
    metrics (as a plain round would); ``site_keys``: the registered identity keys (SEC1 P-384),
    or None. Raises FederationError when the round aborts."""
    r = open_round(cfg, nodes, content, rnd, length, names, say, site_keys)
    adv, nb = advertise_stage(grid, r)
    sh = share_keys_stage(grid, r, adv, nb)
    acc = train_stage(grid, r, sh, on_trained)
    sigs = consistency_stage(grid, r, adv, acc)
    answers = unmask_stage(grid, r, sh, acc, sigs)
    mean, weight = unmask_mean(r, adv, nb, sh, acc, answers)

    reported = reported_weight(adv.counts, acc.u3, nb.cap)
    warn_weights(r, nb, acc, weight, reported)
    stages = [len(nodes), len(nb.u1), len(sh.outbox), len(acc.u3), len(sigs), len(answers)]
    stats = round_stats(r, stages, nb, acc, weight, reported)
    return SecureOutcome(mean=mean, summed={r.name(i): acc.uploaded[i] for i in sorted(acc.u3)}, stats=stats)
