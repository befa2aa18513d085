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
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.common import privacy
from fedtune.common.config import FedTuneConfig
from fedtune.common.protocol import DP_POPULATION_KEY
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

from .messaging import FederationError, Printer, exchange, site_of, site_reason


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
    site_keys: Collection[bytes] | None = None,
) -> SecureOutcome:
    """Run stages 1-5 with ``nodes``. ``content``: what a plain TRAIN message carries;
    ``length``: values in the flat update; ``on_trained(m, node)``: records a training reply's
    metrics (as a plain round would); ``site_keys``: the registered identity keys (SEC1 P-384),
    or None. Raises FederationError when the round aborts."""
    sa, fed = cfg.secure_aggregation, cfg.federation
    tag = os.urandom(p.TAG_BYTES)
    sid_of = {n: i + 1 for i, n in enumerate(sorted(nodes))}
    node_of = {i: n for n, i in sid_of.items()}
    name = lambda sid: names.get(node_of[sid], f"node-{node_of[sid]}")  # noqa: E731
    clip = cfg.secure_clip
    if cfg.privacy.enabled:  # the values are clipped updates plus each site's noise: cover both
        clip = privacy.quantizer_clip(cfg, int(content["config"][DP_POPULATION_KEY]))
    by_examples = fed.weighting == "examples" and not cfg.privacy.enabled  # else every site weighs 1
    registered = None if site_keys is None else set(site_keys)
    timings: dict[str, float] = {}
    dropped: dict[str, list[str]] = {}
    refused: dict[str, str] = {}  # sites the coordinator itself dropped, and why

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

        def seen(m: Message, n: int) -> None:
            if not m.has_error() and kind != MessageType.TRAIN:
                who, status = site_of(m, n, names)
                if status != "ok":  # the site's reason, read as every site string is (messaging.site_reason)
                    refused[who] = f"{status}: {site_reason(m, status)}"
            absorb(m, n, sid_of[n])

        exchange(grid, [node_of[i] for i in targets], lambda n: build(sid_of[n]), kind, timeout, seen)
        timings[label] = round(time.time() - t0, 3)
        dropped[label] = sorted(name(i) for i in set(targets) - set(kept()))
        if dropped[label]:
            why = "; ".join(f"{name(i)}: {refused[name(i)]}" for i in set(targets) - set(kept()) if name(i) in refused)
            say(
                f"round {rnd} secure | {label}: {len(targets) - len(dropped[label])} of {len(targets)} site(s) went on; "
                f"dropped: {', '.join(dropped[label])}" + (f" ({why})" if why else "")
            )

    # The threshold is fixed by the sites invited (not by those that turn up), so dropouts
    # can only make a round abort, never make it easier to unmask.
    k_invited, t = round_threshold(sa.threshold, sa.neighbours, len(nodes))
    why = check_threshold(t, k_invited + 1)
    if why:
        raise FederationError(
            f"round {rnd}: secure aggregation cannot start: secure_aggregation.{why} "
            f"({len(nodes)} site(s) invited, each with {k_invited} neighbour(s)); nothing was sent"
        )

    # 1. advertise signed keys (and, weighting by examples, the example count)
    keys: dict[int, tuple[bytes, bytes]] = {}
    signed: dict[int, tuple[bytes, bytes]] = {}  # sid -> (identity key, signature over its keys)
    counts: dict[int, int] = {}
    run_of: dict[int, int] = {}

    def advertise_content(sid: int) -> RecordDict:
        rec = ConfigRecord(
            {"round-tag": tag, "sid": sid, "n-sites": len(nodes), "clip": clip, "max-weight": sa.max_weight}
        )
        return RecordDict({p.RECORD: rec, "config": content["config"]})

    def got_keys(m: Message, node: int, sid: int) -> None:
        if not _ok(m, node, names):
            return
        rec = m.content[p.RECORD]
        c, s_, pk, sig, n_ex = (
            rec.get("c-pub"),
            rec.get("s-pub"),
            rec.get("signer"),
            rec.get("sig"),
            rec.get("examples"),
        )
        if not (isinstance(c, bytes) and isinstance(s_, bytes) and len(c) == len(s_) == 32):
            return
        who = name(sid)
        if registered is not None and pk not in registered:
            refused[who] = "its advertisement is not signed by a registered site key"
            return
        if any(pk == other for other, _ in signed.values()):
            refused[who] = "it signs with another site's key"
            return
        if not verify(pk, sig, p.advert_payload(m.metadata.run_id, tag, sid, c, s_)):
            refused[who] = "its advertised keys carry no valid signature"
            return
        if by_examples and not (isinstance(n_ex, int) and 1 <= n_ex <= fed.max_examples_per_update):
            refused[who] = (
                f"example count {n_ex!r}: expected 1..{fed.max_examples_per_update} (federation.max_examples_per_update)"
            )
            return
        keys[sid], signed[sid], run_of[sid] = (c, s_), (pk, sig), m.metadata.run_id
        counts[sid] = int(n_ex) if by_examples else 1

    stage(
        p.ADVERTISE, sorted(sid_of.values()), advertise_content, got_keys, sa.stage_timeout_s, "advertise", lambda: keys
    )
    u1 = set(keys)
    need(u1, "key advertisement", t)
    # Still t share holders each: k + 1 = min(k_invited + 1, |u1|), both checked >= t above.
    k = min(k_invited, len(u1) - 1)
    nbrs = neighbours(sorted(u1), k)
    cap = round_weight_cap(counts.values(), fed.weight_cap, sa.max_weight) if by_examples else 1
    q = Quantizer(clip, cap, len(nodes))

    # 2. share keys: each site gets its neighbours' signed keys and their published identity keys
    outbox: dict[int, dict[int, bytes]] = {}

    def share_content(sid: int) -> RecordDict:
        return RecordDict({p.RECORD: p.share_keys_record(tag, t, cap, nbrs[sid], keys, signed, node_of)})

    def got_shares(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            rec = m.content[p.RECORD]
            to, sealed = [int(j) for j in rec.get("to", [])], list(rec.get("sealed", []))
            if sorted(to) == nbrs[sid] and len(sealed) == len(to):
                outbox[sid] = dict(zip(to, sealed))

    stage(p.SHARE_KEYS, sorted(u1), share_content, got_shares, sa.stage_timeout_s, "share_keys", lambda: outbox)
    u2 = set(outbox)
    need(u2, "key sharing", t)
    senders = {i: [j for j in nbrs[i] if j in u2] for i in u2}

    # 3. train and upload masked: one running sum, never one site's vector kept
    total = np.zeros(length + 1, dtype=np.uint32)  # the values, then the weight
    u3: set[int] = set()
    uploaded: dict[int, int] = {}
    clipped = [0]

    def train_content(sid: int) -> RecordDict:
        rec = ConfigRecord({"round-tag": tag, "from": senders[sid], "sealed": [outbox[j][sid] for j in senders[sid]]})
        return RecordDict({**dict(content.items()), p.RECORD: rec})

    def got_masked(m: Message, node: int, sid: int) -> None:
        nonlocal total
        on_trained(m, node)
        if m.has_error() or site_of(m, node, names)[1] != "ok":
            return
        try:
            y = p.read_masked(m.content, length + 1)
        except ValueError:
            return
        total += y
        u3.add(sid)
        clipped[0] += int((m.content.get("metrics") or {}).get("clipped-values", 0))
        uploaded[sid] = len(m.content[p.MASKED]["y"].data)

    stage(MessageType.TRAIN, sorted(u2), train_content, got_masked, fed.round_timeout_s, "train", lambda: u3)
    need(u3, "masked upload (after training)", t)

    # 4. consistency check: every survivor signs the alive set U3
    alive = sorted(u3)
    consistency_sigs: dict[int, bytes] = {}

    def consistency_content(sid: int) -> RecordDict:
        return RecordDict({p.RECORD: ConfigRecord({"round-tag": tag, "alive": alive})})

    def got_signature(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            sig = m.content[p.RECORD].get("sig")
            if verify(signed[sid][0], sig, p.alive_payload(run_of[sid], tag, alive)):
                consistency_sigs[sid] = sig
            else:
                refused[name(sid)] = "its signature on the alive set does not verify"

    stage(
        p.CONSISTENCY,
        alive,
        consistency_content,
        got_signature,
        sa.stage_timeout_s,
        "consistency",
        lambda: consistency_sigs,
    )
    u4 = set(consistency_sigs)
    need(u4, "the consistency check", t)

    # 5. unmask: each survivor gets its own view of U3 and its share holders' signatures on U3
    answers: dict[int, dict[str, dict[int, int]]] = {}

    def unmask_content(sid: int) -> RecordDict:
        mine, gone = unmask_view(u3, senders[sid], sid)
        signers = sorted(u4 & (set(senders[sid]) | {sid}))
        rec = {
            "round-tag": tag,
            "u3": alive,
            "alive": mine,
            "dropped": gone,
            "sig-ids": signers,
            "sigs": [consistency_sigs[j] for j in signers],
        }
        return RecordDict({p.RECORD: ConfigRecord(rec)})

    def got_answer(m: Message, node: int, sid: int) -> None:
        if _ok(m, node, names):
            rec = m.content[p.RECORD]
            try:
                answers[sid] = {
                    "self_seed": dict(
                        zip((int(j) for j in rec["self-ids"]), p.bytes_to_ints(list(rec["self-shares"])))
                    ),
                    "pair_key": dict(zip((int(j) for j in rec["pair-ids"]), p.bytes_to_ints(list(rec["pair-shares"])))),
                }
            except (KeyError, TypeError):
                pass

    stage(p.UNMASK, sorted(u4), unmask_content, got_answer, sa.stage_timeout_s, "unmask", lambda: answers)
    try:
        need(set(answers), "unmasking", t)
        t0 = time.time()
        total = unmask_sum(total, u3, keys, u2, nbrs, answers, t, tag)
        mean, weight = q.decode(total, len(u3))  # refuses a sum that is not of updates and weights
        timings["unmask_compute"] = round(time.time() - t0, 3)
    except SecAggError as e:
        raise FederationError(f"round {rnd}: secure aggregation aborted, nothing released: {e}") from None
    bound = q.mean_error_bound(weight, len(u3))
    reported = sum(min(counts[i], cap) for i in u3)
    if weight != reported:
        say(
            f"round {rnd} secure | the summed sites encoded a total weight of {weight}, but reported {reported} "
            f"(their example counts, capped at {cap}): a site encodes another weight than it reports. The mean divides by {weight}, "
            f"what was encoded; no site weighs more than {cap}."
        )
    stats = {
        "secure": True,
        "threshold": t,
        "neighbours": k,
        "sites_per_stage": [len(nodes), len(u1), len(u2), len(u3), len(u4), len(answers)],
        "dropped": {k_: v for k_, v in dropped.items() if v},
        "summed_weight": weight,
        "reported_weight": reported,
        "weight_cap": cap,
        "identity_keys": "registered" if registered is not None else "as presented (no registry)",
        "clip": q.clip,
        "clipped_values": clipped[0],
        "quantization_error_bound": bound,
        "upload_bytes_per_param": round(max(uploaded.values()) / max(length, 1), 4),
        "stage_seconds": timings,
    }
    if refused:
        stats["refused_by_coordinator"] = dict(refused)
    if clipped[0]:
        say(
            f"round {rnd} secure | {clipped[0]:,} update value(s) exceeded secure_aggregation.clip {q.clip:g} and were clipped; "
            "raise the clip if this recurs"
        )
    return SecureOutcome(mean=mean, summed={name(i): uploaded[i] for i in sorted(u3)}, stats=stats)
