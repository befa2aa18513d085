"""Flower 1.42's own legacy SecAgg+ on given vectors, with no model: a reference and a yardstick.

    from flower_secagg import flower_secaggplus, flower_plain_fedavg, reference_mean, aggregate_error_bound
    r = flower_secaggplus([x1, x2, x3], [3, 10, 7])
    r.aggregate, r.seconds, r.upload_bytes_per_param

Each virtual client's ``fit`` returns its given vector as the updated parameters and its given
weight as ``num_examples``. The server side is Flower's own ``DefaultWorkflow`` +
``SecAggPlusWorkflow`` (``LegacyContext``, legacy ``FedAvg``), the client side Flower's
``secaggplus_mod`` on a ``NumPyClient``, all inside ``flwr.simulation.run_simulation`` (Ray).
Uses: (1) a cross-check that our SecAgg+ aggregate matches Flower's, (2) round time and upload
bytes of Flower's SecAgg+ against ours.

**What Flower computes** (read off ``secaggplus_mod._collect_masked_vectors`` and
``SecAggPlusWorkflow.unmask_stage``). With Q = ``quantization_range``, c = ``clipping_range``,
W = ``max_weight``, M = ``modulus_range`` and m clients, client i with vector x_i and weight n_i:

- its weight is quantized: ``q_i = round(n_i * Q / W)`` (Python's round), ``a_i = q_i / Q``;
- it scales *then* clips: ``y_i = clip(a_i * x_i, -c, c)``, so clipping bites where
  ``|x_i| > c * Q / q_i`` (about ``c * W / n_i``), not where ``|x_i| > c``;
- it quantizes ``y_i`` stochastically (unbiased) to ``u_i`` in ``[0, Q]``:
  ``u_i = floor or ceil of (y_i + c) * Q / (2c)``, so ``|u_i - (y_i + c) Q / (2c)| < 1``;
- it uploads ``[q_i, u_i]`` (the weight goes first, as a 1-element array), masked mod M, as int64;
- the server unmasks the sums ``sum q_i`` and ``sum u_i`` (mod M) and returns
  ``(sum_i (u_i * 2c/Q - c)) * Q / sum_i q_i``. Legacy ``FedAvg.aggregate_fit`` then averages m
  copies of that vector (each ``FitRes.parameters`` is replaced by it), which changes it only
  by float rounding (a few ulps).

So, where nothing is clipped, the returned ``aggregate`` (global parameters start at zeros, so
it is the new global model) is the mean of the vectors weighted by the *quantized* weights,
plus a zero-mean quantization error::

    aggregate = sum_i q_i x_i / sum_i q_i  + e,   |e| < 2c * m / sum_i q_i          (per coordinate)

(``reference_mean(..., quantized_weights=True)`` and ``aggregate_error_bound(..., max_abs=0)``).
Against the plain weighted mean ``sum_i n_i x_i / sum_i n_i``, the weight rounding adds at
most ``max_i |x_i| * m / sum_i q_i`` (|q_i - n_i Q / W| <= 1/2), hence::

    |aggregate - sum n_i x_i / sum n_i|  <  m * (2c + max_i |x_i|) / sum_i q_i          (per coordinate)

which ``aggregate_error_bound(weights, ..., max_abs=max |x|)`` returns. It is strict up to
float64 rounding (relative ~1e-16 of ``m * c``, far below it). The typical error is smaller:
each rounding error has variance <= 1/4, so the std is <= ``c * sqrt(m) / sum_i q_i``.
With Flower's defaults (c = 8, Q = 2**22, W = 1000) and weights 3, 10, 7, 1, 5 the bound is
7.3e-4 for values ~0.01; one client of weight 1 alone has a resolution of 2cW/Q = 3.8e-3.
Pick ``max_weight`` near the largest weight and ``clipping_range`` near ``max |a_i x_i|`` to
see Flower's arithmetic at its best.

Overflow: the unmasked sums are taken mod M, so they must stay below M: ``m * Q < M`` and
``sum_i q_i < M`` (clients with ``n_i > W`` warn). Also ``Q < 2**31`` (Flower rounds into
int32). A client whose ``q_i`` rounds to 0 contributes nothing.

**What is timed** (``seconds``): wall time of the fit stage alone, i.e. one call of the
``fit_workflow`` that ``DefaultWorkflow`` runs for round 1: ``configure_fit``, the four SecAgg+
stages (setup, share keys, collect masked vectors -- the clients' ``fit`` and masking --,
unmask) with the server's unmasking, ``FedAvg.aggregate_fit`` and storing the new global
parameters. Excluded: Ray start-up, actor start-up, a warm-up message to every client before
the workflow (so that every Ray actor is up and has imported everything), the initial-parameters
stage and evaluation (none: ``fraction_evaluate=0``). Flower's in-memory Grid polls for replies
every 0.1 s inside ``send_and_receive`` (what its workflows use), so each SecAgg+ stage costs up
to ~0.1 s of polling whatever the work. The engine itself is prepared as ftsim prepares it
(``fedtune.simulations.cli.prepare_engine``: messages picked up every 0.01 s, not 0.1 s), for
every arm alike.

**Upload**: ``upload_bytes`` is what one client's reply to the collect-masked-vectors stage
carries (``.npy`` bytes of its masked int64 arrays: the vector and the 1-element weight, each
with a 128-byte header), the largest over clients; ``upload_bytes_per_param`` divides it by the
number of parameters (-> 8 + ~264/n). ``setup_upload_bytes`` is one client's bytes in the other
three stages (public keys, encrypted shares, unmasking shares), largest over clients.

Ray: every call runs ``run_simulation`` once (it is what starts the ServerApp and the virtual
clients). Ray itself is started once per process (``fedtune.simulations.cli.start_ray``) and
kept up between calls: Flower's Ray backend calls ``ray.shutdown()`` when a simulation ends,
which we skip during our calls (its actors are still terminated). Call :func:`shutdown` when
done (or leave it to Ray's exit hook). One Ray actor per ``cpus_per_client`` CPUs (default 1:
two actors on 2 cores), each serving its share of the virtual clients in turn.

Measured on the 2-core dev machine (10 clients, Flower's defaults): 1M parameters, 1.9 s a round
(a call 10 s with Ray's start, 5.5 s after), peak RSS summed over the process tree 1.8 GiB;
10M parameters, 16.4 s a round, 29 s a call, 5.1 GiB (driver 2.5 GiB, including the inputs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class FlowerSecAggResult:
    aggregate: (
        np.ndarray
    )  # Flower's new global parameters (1-D float64) from global params at zeros; see the module docstring
    seconds: float  # wall time of the fit stage alone (module docstring: "What is timed")
    upload_bytes_per_param: (
        float  # upload_bytes / number of parameters (~8: int64 for SecAgg+, float64 for plain FedAvg)
    )
    upload_bytes: int = (
        0  # one client's vector upload (masked int64 .npy blobs; plain: its float64 .npy), largest over clients
    )
    setup_upload_bytes: int = (
        0  # one client's bytes in the other SecAgg+ stages (keys, shares), largest over clients; 0 for plain
    )


# ------------------------------------------------------------------ semantics, for callers


def quantized_weights(weights, *, max_weight: float = 1000.0, quantization_range: int = 2**22) -> np.ndarray:
    """The integer weights Flower's SecAgg+ really applies: ``round(n_i * Q / W)`` (Python's round, as Flower)."""
    return np.array([round(n / max_weight * quantization_range) for n in weights], dtype=np.float64)


def reference_mean(
    vectors, weights, *, quantized: bool = False, max_weight: float = 1000.0, quantization_range: int = 2**22
) -> np.ndarray:
    """``sum w_i x_i / sum w_i`` in float64; with ``quantized=True`` over Flower's quantized weights."""
    w = (
        quantized_weights(weights, max_weight=max_weight, quantization_range=quantization_range)
        if quantized
        else np.asarray(weights, dtype=np.float64)
    )
    acc = np.zeros(np.asarray(vectors[0]).size, dtype=np.float64)
    for wi, x in zip(w, vectors):
        acc += wi * np.asarray(x, dtype=np.float64).ravel()
    return acc / w.sum()


def aggregate_error_bound(
    weights,
    *,
    max_abs: float = 0.0,
    clipping_range: float = 8.0,
    max_weight: float = 1000.0,
    quantization_range: int = 2**22,
) -> float:
    """Per-coordinate bound on ``|aggregate - weighted mean|`` for a call with these settings, where nothing is clipped.

    ``max_abs=0``: against ``reference_mean(..., quantized=True)`` (quantization only),
    ``m * 2c / sum q_i``. ``max_abs=max |x|``: against the plain weighted mean ``sum n_i x_i /
    sum n_i``, ``m * (2c + max_abs) / sum q_i``. Nothing is clipped while ``|x_i| * q_i / Q <= c``.
    """
    q = quantized_weights(weights, max_weight=max_weight, quantization_range=quantization_range)
    m = len(q)
    return m * (2 * clipping_range + max_abs) / q.sum()


# ------------------------------------------------------------------ Ray, kept up between calls

_ray_lock = threading.Lock()


@contextlib.contextmanager
def _flower_keeps_ray():
    """While inside: Flower's Ray backend terminates its actors at the end of a simulation but leaves Ray up."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.terminate

    def terminate_actors_only(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    RayBackend.terminate = terminate_actors_only
    try:
        yield
    finally:
        RayBackend.terminate = original


def shutdown() -> None:
    """Shut Ray down (the harness leaves it up between calls)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def _quiet_flower() -> None:
    """Flower's engine as ftsim prepares it (warnings only, messages picked up every 0.01 s)."""
    from fedtune.simulations.cli import prepare_engine

    prepare_engine()


def _ship_by_value(*modules) -> None:
    """Ray workers get these modules' client code by value, whatever name they were imported under."""
    import ray.cloudpickle

    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)


# ------------------------------------------------------------------ the apps


def _make_client_app(paths: list[str], weights: list[int], secure: bool):
    """A ClientApp whose client ``partition-id`` returns ``np.load(paths[i])`` with ``num_examples = weights[i]``."""
    from flwr.client import ClientApp, NumPyClient

    class VectorClient(NumPyClient):
        def __init__(self, path: str, weight: int):
            self.path, self.weight = path, weight

        def fit(self, parameters, config):
            return [np.load(self.path)], self.weight, {}

        def evaluate(self, parameters, config):  # only the warm-up calls this
            return 0.0, 1, {}

    def client_fn(context):
        i = int(context.node_config["partition-id"])
        return VectorClient(paths[i], weights[i]).to_client()

    if secure:
        from flwr.client.mod import secaggplus_mod

        return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    return ClientApp(client_fn=client_fn)


class _MeteredGrid:
    """Delegates to Flower's Grid; notes the payload bytes of every reply, per sending node."""

    def __init__(self, grid):
        self._grid = grid
        self.vector_bytes: dict[int, int] = {}
        self.other_bytes: dict[int, int] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            if msg.has_error():
                continue
            nid = msg.metadata.src_node_id
            vec = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
            other = 0
            for name, rec in msg.content.config_records.items():
                for key, value in rec.items():
                    n = _bytes_in(value)
                    if name == RECORD_KEY_CONFIGS and key == Key.MASKED_PARAMETERS:
                        vec += n
                    else:
                        other += n
            if vec:
                self.vector_bytes[nid] = self.vector_bytes.get(nid, 0) + vec
            self.other_bytes[nid] = self.other_bytes.get(nid, 0) + other
        return replies


def _bytes_in(value) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list):
        return sum(len(v) for v in value if isinstance(v, bytes))
    return 0


class _TimedFit:
    """The round's fit workflow, timed, on a metered Grid; keeps the new global parameters."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = None
        self.grid = None
        self.aggregate = None

    def __call__(self, grid, context) -> None:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import parameters_to_ndarrays
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        self.grid = _MeteredGrid(grid)
        t0 = time.perf_counter()
        self.inner(self.grid, context)
        self.seconds = time.perf_counter() - t0
        params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        self.aggregate = parameters_to_ndarrays(params)


def _warm_up(grid, num_nodes: int, wait_s: float = 300.0) -> None:
    """Wait for every virtual node, then have each answer one EVALUATE message (starts the Ray actors)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.app.message_type import MessageType
    from flwr.common import EvaluateIns, Parameters

    deadline = time.monotonic() + wait_s
    while len(nodes := list(grid.get_node_ids())) < num_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_nodes} virtual clients registered in {wait_s:.0f} s")
        time.sleep(0.05)
    content = compat.evaluateins_to_recorddict(
        EvaluateIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {}), True
    )
    msgs = [
        Message(content=content, dst_node_id=nid, message_type=MessageType.EVALUATE, group_id="warm-up")
        for nid in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=wait_s))
    bad = [r for r in replies if r.has_error()]
    if len(replies) < num_nodes or bad:
        raise RuntimeError(
            f"warm-up: {len(replies) - len(bad)} of {num_nodes} virtual clients answered"
            + (f"; first error: {bad[0].error}" if bad else "")
        )


def _make_server_app(num_clients: int, num_params: int, fit_workflow, out: list):
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        _warm_up(grid, num_clients)
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(num_params, dtype=np.float64)]),
            fit_metrics_aggregation_fn=lambda _: {},
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        out.append(fit_workflow)

    return app


# ------------------------------------------------------------------ entry points


def _check_inputs(vectors, weights) -> tuple[list[np.ndarray], list[int]]:
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    if len(vectors) < 2:
        raise ValueError("Flower's SecAgg+ needs at least 2 clients")
    vecs = [np.ascontiguousarray(np.asarray(v, dtype=np.float64).ravel()) for v in vectors]
    if len({v.size for v in vecs}) != 1 or vecs[0].size == 0:
        raise ValueError("vectors must be non-empty and of one length")
    ws = [int(w) for w in weights]
    if any(w != wf or w < 0 for w, wf in zip(ws, weights)):
        raise ValueError("weights are num_examples: non-negative integers")
    return vecs, ws


def simulate(vectors, weights, server_app_for, client_app_for, cpus_per_client: float = 1.0) -> None:
    """Run ``server_app_for(n_clients, n_params)`` with ``client_app_for(paths, weights)`` in
    Flower's simulation engine, one virtual client per vector. Client ``i`` reads its vector
    from ``paths[i]`` (Ray ships the ClientApp with every message, so vectors stay on disk).
    Ray is started once per process and kept up between calls (see "Ray" above)."""
    from flwr.simulation import run_simulation

    from fedtune.simulations.cli import start_ray

    vecs, ws = _check_inputs(vectors, weights)
    m, n = len(vecs), vecs[0].size
    _quiet_flower()
    with _ray_lock, tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        paths = []
        for i, v in enumerate(vecs):
            paths.append(os.path.join(tmp, f"client{i}.npy"))
            np.save(paths[-1], v)
        del vecs
        start_ray()
        _ship_by_value(sys.modules[__name__], sys.modules[client_app_for.__module__])
        cpus = min(float(cpus_per_client), float(os.cpu_count() or 1))
        with _flower_keeps_ray():
            run_simulation(
                server_app=server_app_for(m, n),
                client_app=client_app_for(paths, ws),
                num_supernodes=m,
                backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
            )


def _run(vectors, weights, fit_workflow, secure: bool, cpus_per_client: float) -> FlowerSecAggResult:
    timed = _TimedFit(fit_workflow)
    out: list = []
    simulate(
        vectors,
        weights,
        lambda m, n: _make_server_app(m, n, timed, out),
        lambda paths, ws: _make_client_app(paths, ws, secure),
        cpus_per_client,
    )
    n = np.asarray(vectors[0]).size
    if not out or timed.aggregate is None or timed.seconds is None:
        raise RuntimeError("the Flower simulation ended without an aggregate (see Flower's messages above)")
    if len(timed.aggregate) != 1 or timed.aggregate[0].size != n:
        raise RuntimeError(
            f"Flower returned {len(timed.aggregate)} arrays, expected one of {n} values (the round failed?)"
        )
    vec_bytes = max(timed.grid.vector_bytes.values(), default=0)
    other = max(timed.grid.other_bytes.values(), default=0) if secure else 0
    return FlowerSecAggResult(
        aggregate=np.asarray(timed.aggregate[0], dtype=np.float64).ravel(),
        seconds=timed.seconds,
        upload_bytes_per_param=vec_bytes / n,
        upload_bytes=vec_bytes,
        setup_upload_bytes=other,
    )


def _majority_threshold(num_shares: int | float, m: int) -> int:
    """A majority of the share holders, with Flower's rule for how many there are (setup_stage)."""
    if isinstance(num_shares, float) or num_shares == 1:
        k = round(float(num_shares) * m)
        if k < m and k % 2 == 0:
            k += 1
        if k <= 2:
            k = m
    else:
        k = num_shares
    return max(k // 2 + 1, 2)


def flower_secaggplus(
    vectors: list[np.ndarray],
    weights: list[int],
    *,
    num_shares: int | float = 1.0,
    reconstruction_threshold: int | float | None = None,
    max_weight: float = 1000.0,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    timeout: float | None = None,
    cpus_per_client: float = 1.0,
) -> FlowerSecAggResult:
    """One round of Flower's legacy SecAgg+ + FedAvg over ``vectors`` weighted by ``weights`` (num_examples).

    ``num_shares``, ``reconstruction_threshold``, ``max_weight``, ``clipping_range``,
    ``quantization_range``, ``modulus_range`` and ``timeout`` go to ``SecAggPlusWorkflow``
    unchanged, with its semantics (a float ``num_shares`` is a fraction of the clients: 1.0,
    the default, makes every client every other's neighbour; a float threshold a fraction of
    ``num_shares``). ``reconstruction_threshold=None`` means a majority of the share holders.
    The quantization defaults are Flower's (W=1000, c=8, Q=2**22, M=2**32).

    Returns Flower's new global parameters from zeros, i.e. ``sum q_i x_i / sum q_i`` with
    ``q_i = round(n_i Q / W)`` plus quantization error below ``m * 2c / sum q_i`` per
    coordinate, within ``m * (2c + max|x|) / sum q_i`` of ``sum n_i x_i / sum n_i`` (where
    nothing is clipped; see the module docstring and :func:`aggregate_error_bound`).
    """
    from flwr.server.workflow import SecAggPlusWorkflow

    m = len(vectors)
    if reconstruction_threshold is None:
        reconstruction_threshold = _majority_threshold(num_shares, m)
    if m * quantization_range >= modulus_range:
        raise ValueError(
            f"{m} clients x quantization_range {quantization_range} >= modulus_range {modulus_range}: the sum would wrap"
        )
    if quantization_range >= 2**31:
        raise ValueError("quantization_range must be < 2**31 (Flower quantizes into int32)")
    workflow = SecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=float(max_weight),
        clipping_range=float(clipping_range),
        quantization_range=int(quantization_range),
        modulus_range=int(modulus_range),
        timeout=timeout,
    )
    return _run(vectors, weights, workflow, secure=True, cpus_per_client=cpus_per_client)


def flower_plain_fedavg(
    vectors: list[np.ndarray], weights: list[int], *, cpus_per_client: float = 1.0
) -> FlowerSecAggResult:
    """The same harness without secure aggregation: Flower's default fit workflow and legacy FedAvg.

    ``aggregate`` is ``sum n_i x_i / sum n_i`` up to float64 rounding; ``seconds`` is timed the
    same way (one fit workflow call); the upload is each client's float64 ``.npy`` (8 B/param).
    """
    from flwr.server.workflow.default_workflows import default_fit_workflow

    return _run(vectors, weights, default_fit_workflow, secure=False, cpus_per_client=cpus_per_client)


if __name__ == "__main__":  # a quick look: python benchmarks/flower_secagg.py [clients] [params]
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-0.01, 0.01, n) for _ in range(m)]
    ws = [int(w) for w in rng.integers(1, 11, m)]
    for name, fn in (("secagg+", flower_secaggplus), ("plain", flower_plain_fedavg)):
        r = fn(xs, ws)
        err = float(np.abs(r.aggregate - reference_mean(xs, ws)).max())
        print(
            f"{name}: {m} clients x {n} params: {r.seconds:.3f} s, {r.upload_bytes_per_param:.3f} B/param, max |err| {err:.3g}"
        )
    print(f"bound (defaults): {aggregate_error_bound(ws, max_abs=0.01):.3g}")
    shutdown()
