"""The coordinator's side of a secure round (SecAgg+; the message flow is in
:mod:`fedtune.common.secagg.protocol`).

The coordinator never holds one site's update: it relays public keys and sealed shares, adds
masked vectors into one running mod-2^32 sum as they arrive, and with the survivors' shares
removes the masks from that sum only. What comes out is the example-weighted mean of the
summed sites' updates (as a flat vector in the global adapter's order), off by at most the
stated quantization bound. Each stage has a deadline; a site that misses one is a dropout.
Below ``threshold`` (or ``federation.min_sites``) survivors at any stage, the round aborts and
nothing is released.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.common import privacy
from fedtune.common.config import FedTuneConfig
from fedtune.common.protocol import DP_POPULATION_KEY
from fedtune.common.secagg import Quantizer, SecAggError, check_threshold, neighbours, round_threshold, unmask_sum
from fedtune.common.secagg import protocol as p

from .messaging import FederationError, Printer, exchange, site_of


@dataclass
class SecureOutcome:
    mean: np.ndarray  # float64, the weighted mean of the summed sites' updates
    summed: dict[str, int]  # the sites summed -> the bytes each uploaded
    stats: dict = field(default_factory=dict)


def _ok(m: Message, node: int, names: dict) -> bool:
    return not m.has_error() and site_of(m, node, names)[1] == "ok" and p.RECORD in m.content


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
) -> SecureOutcome:
    """Run stages 1-4 with ``nodes``. ``content``: what a plain TRAIN message carries;
    ``length``: values in the flat update; ``on_trained(m, node)``: records a training reply's
    metrics (as a plain round would). Raises FederationError when the round aborts."""
    sa, fed = cfg.secure_aggregation, cfg.federation
    tag = os.urandom(p.TAG_BYTES)
    sid_of = {n: i + 1 for i, n in enumerate(sorted(nodes))}
    node_of = {i: n for n, i in sid_of.items()}
    name = lambda sid: names.get(node_of[sid], f"node-{node_of[sid]}")  # noqa: E731
    clip = cfg.secure_clip
    if cfg.privacy.enabled:  # the values are clipped updates plus each site's noise: cover both
        clip = privacy.quantizer_clip(cfg, int(content["config"][DP_POPULATION_KEY]))
    q = Quantizer(clip, sa.max_weight, len(nodes))
    timings: dict[str, float] = {}
    dropped: dict[str, list[str]] = {}

    def need(alive: set[int], stage: str, t: int) -> None:
        if len(alive) < max(t, fed.min_sites, 2):
            raise FederationError(
                f"round {rnd}: secure aggregation aborted at {stage}: {len(alive)} site(s) left, "
                f"{max(t, fed.min_sites, 2)} needed (secure_aggregation.threshold {t}, federation.min_sites {fed.min_sites}); "
                f"nothing was unmasked or released. The global adapter stays at round {rnd - 1}; the run can be resumed."
            )

    def stage(kind: str, targets: list[int], build, absorb, timeout: float, label: str, kept) -> None:
        """One exchange; ``kept()``: the sites it left in the round. Dropouts are named at once."""
        t0 = time.time()
        exchange(grid, [node_of[i] for i in targets], lambda n: build(sid_of[n]), kind, timeout, lambda m, n: absorb(m, n, sid_of[n]))
        timings[label] = round(time.time() - t0, 3)
        dropped[label] = sorted(name(i) for i in set(targets) - set(kept()))
        if dropped[label]:
            say(f"round {rnd} secure | {label}: {len(targets) - len(dropped[label])} of {len(targets)} site(s) went on; dropped: {', '.join(dropped[label])}")

    # The threshold is fixed by the sites invited (not by those that turn up), so dropouts
    # can only make a round abort, never make it easier to unmask.
    k_invited, t = round_threshold(sa.threshold, sa.neighbours, len(nodes))
    why = check_threshold(t, k_invited + 1)
    if why:
        raise FederationError(
            f"round {rnd}: secure aggregation cannot start: secure_aggregation.{why} "
            f"({len(nodes)} site(s) invited, each with {k_invited} neighbour(s)); nothing was sent"
        )

    # 1. advertise keys
    keys: dict[int, tuple[bytes, bytes]] = {}

    def advertise_content(sid: int) -> RecordDict:
        rec = ConfigRecord({"round-tag": tag, "sid": sid, "n-sites": len(nodes), "clip": q.clip, "max-weight": sa.max_weight})
        return RecordDict({p.RECORD: rec})

    def got_keys(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            c, s_ = m.content[p.RECORD].get("c-pub"), m.content[p.RECORD].get("s-pub")
            if isinstance(c, bytes) and isinstance(s_, bytes) and len(c) == len(s_) == 32:
                keys[sid] = (c, s_)

    stage(p.ADVERTISE, sorted(sid_of.values()), advertise_content, got_keys, sa.stage_timeout_s, "advertise", lambda: keys)
    u1 = set(keys)
    need(u1, "key advertisement", t)
    # Still t share holders each: k + 1 = min(k_invited + 1, |u1|), both checked >= t above.
    k = min(k_invited, len(u1) - 1)
    nbrs = neighbours(sorted(u1), k)

    # 2. share keys
    outbox: dict[int, dict[int, bytes]] = {}

    def share_content(sid: int) -> RecordDict:
        ids = nbrs[sid]
        rec = ConfigRecord({"round-tag": tag, "threshold": t, "nbr-ids": ids, "nbr-c": [keys[j][0] for j in ids], "nbr-s": [keys[j][1] for j in ids]})
        return RecordDict({p.RECORD: rec})

    def got_shares(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            rec = m.content[p.RECORD]
            to, sealed = [int(j) for j in rec.get("to", [])], list(rec.get("sealed", []))
            if sorted(to) == nbrs[sid] and len(sealed) == len(to):
                outbox[sid] = dict(zip(to, sealed))

    stage(p.SHARE_KEYS, sorted(u1), share_content, got_shares, sa.stage_timeout_s, "share_keys", lambda: outbox)
    u2 = set(outbox)
    need(u2, "key sharing", t)

    # 3. train and upload masked: one running sum, never one site's vector kept
    total = np.zeros(length, dtype=np.uint32)
    u3: set[int] = set()
    weights: dict[int, int] = {}
    uploaded: dict[int, int] = {}
    clipped = [0]

    def train_content(sid: int) -> RecordDict:
        senders = [j for j in nbrs[sid] if j in u2]
        rec = ConfigRecord({"round-tag": tag, "from": senders, "sealed": [outbox[j][sid] for j in senders]})
        return RecordDict({**dict(content.items()), p.RECORD: rec})

    def got_masked(m: Message, node: int, sid: int) -> None:
        nonlocal total
        on_trained(m, node)
        if m.has_error() or site_of(m, node, names)[1] != "ok":
            return
        mr = m.content.get("metrics") or {}
        w = mr.get("secagg-weight")
        try:
            y = p.read_masked(m.content, length)
        except ValueError:
            return
        if not (isinstance(w, int) and 1 <= w <= sa.max_weight):
            return
        total += y
        u3.add(sid)
        weights[sid] = w
        clipped[0] += int(mr.get("clipped-values", 0))
        uploaded[sid] = len(m.content[p.MASKED]["y"].data)

    stage(MessageType.TRAIN, sorted(u2), train_content, got_masked, fed.round_timeout_s, "train", lambda: u3)
    need(u3, "masked upload (after training)", t)

    # 4. unmask
    answers: dict[int, dict[str, dict[int, int]]] = {}
    dead = sorted(u2 - u3)

    def unmask_content(sid: int) -> RecordDict:
        return RecordDict({p.RECORD: ConfigRecord({"round-tag": tag, "alive": sorted(u3), "dropped": dead})})

    def got_answer(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            rec = m.content[p.RECORD]
            try:
                answers[sid] = {
                    "self_seed": dict(zip((int(j) for j in rec["self-ids"]), p.bytes_to_ints(list(rec["self-shares"])))),
                    "pair_key": dict(zip((int(j) for j in rec["pair-ids"]), p.bytes_to_ints(list(rec["pair-shares"])))),
                }
            except (KeyError, TypeError):
                pass

    stage(p.UNMASK, sorted(u3), unmask_content, got_answer, sa.stage_timeout_s, "unmask", lambda: answers)
    try:
        need(set(answers), "unmasking", t)
        t0 = time.time()
        total = unmask_sum(total, u3, keys, u2, nbrs, answers, t, tag)
        weight = sum(weights[i] for i in u3)  # the summed sites' reported (capped) example counts
        mean = q.decode_mean(total, len(u3), weight)  # refuses a sum that is not of updates
        timings["unmask_compute"] = round(time.time() - t0, 3)
    except SecAggError as e:
        raise FederationError(f"round {rnd}: secure aggregation aborted, nothing released: {e}") from None
    bound = q.mean_error_bound(weight, len(u3))
    stats = {
        "secure": True,
        "threshold": t,
        "neighbours": k,
        "sites_per_stage": [len(nodes), len(u1), len(u2), len(u3), len(answers)],
        "dropped": {k_: v for k_, v in dropped.items() if v},
        "summed_weight": weight,
        "clip": q.clip,
        "clipped_values": clipped[0],
        "quantization_error_bound": bound,
        "upload_bytes_per_param": round(max(uploaded.values()) / max(length, 1), 4),
        "stage_seconds": timings,
    }
    if clipped[0]:
        say(
            f"round {rnd} secure | {clipped[0]:,} update value(s) exceeded secure_aggregation.clip {q.clip:g} and were clipped; "
            "raise the clip if this recurs"
        )
    return SecureOutcome(mean=mean, summed={name(i): uploaded[i] for i in sorted(u3)}, stats=stats)
