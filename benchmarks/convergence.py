#!/usr/bin/env python
"""Convergence benchmark: the demo task with N peers for a fixed number of samples per peer, four ways of
keeping the peers together, compared by validation loss at equal samples and by averaging traffic per peer.

Task (what ``swarmtrain demo`` trains): the default run manifest's :class:`~swarmtrain.peer.model.SwarmModel`
(text + image, hidden 64, 2 layers, 4 experts per modality and layer, top-2, Adam lr 3e-3, batch 16 per modality)
on the bundled data (:meth:`~swarmtrain.peer.data.DataSource.builtin`). Unlike the demo, every expert is held
locally by every peer (:class:`~swarmtrain.expert_pool.dispatch.LocalDispatcher`), so *all* parameters (trunk and
experts, ~607k elements) are replicated, trained and averaged. Peer ``i`` trains on shard ``i/N`` exactly as
``swarmtrain demo`` assigns them: the text shard is a contiguous chunk of the Python reference (different topics
per peer: non-IID), the digit images every N-th training item. Every variant starts from the same initial model
(the manifest's seed), each peer draws the same batches in every variant (Trainer seed ``1000 (seed + 1) +
rank``), runs the same number of steps (``--samples`` per peer / 32 samples per step), then pauses
``--step-delay`` s (default 0: the peers train flat out, as a volunteer's peer does, and every variant's N
single-threaded peers share this machine's cores the same way; the averager runs in the background beside
training, so exchanges overlap local steps and are applied ``tau`` steps after their snapshot; a pause makes steps
slower relative to exchanges and exchanges less stale):

* ``sync`` (reference): exact synchronous data parallelism: N processes all-reduce (average) their *gradients*
  with ``torch.distributed`` (gloo on 127.0.0.1) after every backward, before every optimizer step; the peers'
  models stay identical.
* ``ours``: :class:`~swarmtrain.averaging.gossip.GossipAverager` in the background while training goes on, codec
  ``8bit``, the default ``delta`` rule (an exchange lands as a delta on the live parameters: local progress made
  during the exchange is kept) with staleness scaling: delay compensation.
* ``no_dc``: the same gossip, codec ``8bit``, with ``rule="overwrite"`` and no staleness scaling: the parameters are
  set to the pair average of the exchange's snapshot, whatever was trained since the snapshot is lost.
* ``no_avg``: N peers training alone.
* ``gossip_fp32``: ``ours`` with codec ``none`` (float32 on the wire), for ``fp32_bytes_per_peer``.

All gossip variants use ``--period`` s, the manifest's other averaging defaults (8-bit: ``adaptive_precision`` on,
i.e. values as float16 once the pair is close; ``--no-adaptive-precision``: always 8-bit) and report the staleness
``tau`` of the exchanges they initiated (read where the averager computes its mixing factor from it).

Averaging traffic per peer is the averager's own counters (``AveragingStats.bytes_sent + bytes_received``: payload
bytes of every averaging message this peer sent or received), averaged over peers. Validation loss is
``Trainer.evaluate`` (the demo's weighted loss: text + image + 0.5 contrastive, no router losses) over the whole
fixed held-out split (``--val-batches 0``; the same batches of 16 for every variant and peer), evaluated after each
peer's last step. The headline ``<variant>_val_loss`` keys are the mean over peers of each peer's OWN model's
validation loss (the models users actually hold); ``<variant>_val_loss_mean_model`` is the loss of the peers'
parameter average. ``fp32_bytes_per_peer`` is what ours' own exchanges (its count per peer) would have moved in
float32: the bytes per exchange measured by ``gossip_fp32`` times ours' exchanges per peer (each variant's own
measured totals are ``<variant>_bytes_per_peer``). The LAST line printed is one JSON object with those keys plus
``samples`` (per peer), per-exchange bytes, the goals' checks, the config and every variant's detail.

The validation loss of one run at one point of training is noisy (with the same model and data, the exact
reference alone ranges over ~3% between batch orders), so every variant runs ``--repeats`` times (default 3), run
``r`` with batch seed ``--seed + r`` in every variant, and the JSON reports each variant's medians (``variants``
holds every run's figures; ``goals`` also compares ours with the others seed by seed). ``gossip_fp32`` runs once:
its bytes per exchange do not depend on the batches. The N peer processes are started once and reused: each run
builds model, optimizer, trainer and the variant's swarm node + averager or process group afresh.

Run: ``.venv/bin/python benchmarks/convergence.py [--peers 4] [--samples 8000] [--repeats 3] [--period 0.25]
[--step-delay 0] [--variants ...]`` (about 11 minutes on 2 otherwise idle cores).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
RUN_ID = "convbench"
COORDINATOR = "1" * 40  # placeholder: nobody signs or checks a manifest here
VARIANTS = ("sync", "ours", "no_dc", "no_avg", "gossip_fp32")
GOSSIP = ("ours", "no_dc", "gossip_fp32")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8000,
                        help="training samples per peer (text sequences + images; 32 per step at the demo's batch)")
    parser.add_argument("--period", type=float, default=0.25, help="averaging period of each gossiping peer (s)")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="pause after each local step (s), the same in every variant (0: train flat out)")
    parser.add_argument("--adaptive-precision", action=argparse.BooleanOptionalAction, default=True,
                        help="8-bit variants: the manifest option adaptive_precision (values as float16 when the "
                             "partner is close; off: always 8-bit, ~1 byte per element each way)")
    parser.add_argument("--reference-partners", type=int, default=None,
                        help="8-bit variants: the manifest option reference_partners (default: the manifest's)")
    parser.add_argument("--entropy-coding", action=argparse.BooleanOptionalAction, default=None,
                        help="8-bit variants: the manifest option entropy_coding (default: the manifest's)")
    parser.add_argument("--lr", type=float, default=0.0, help="Adam learning rate (0: the manifest's, 3e-3)")
    parser.add_argument("--val-batches", type=int, default=0, help="validation batches of 16 (0: the whole split)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every variant, repeat r with batch seed --seed + r (medians are reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the peers' batch order (not of the model)")
    parser.add_argument("--timeout", type=float, default=900, help="give up on a variant after this many seconds")
    return parser.parse_args()


def make_manifest(args):
    """The demo's default manifest (optionally with another learning rate)."""
    from swarmtrain.dht.records import Manifest, OptimizerSpec

    fields = dict(run_id=RUN_ID, created_at=0.0, coordinator=COORDINATOR)
    if args.lr:
        fields["optimizer"] = OptimizerSpec(lr=args.lr)
    return Manifest(**fields)


def averaging_spec(args, variant: str):
    from swarmtrain.dht.records import AveragingSpec

    options = {"adaptive_precision": args.adaptive_precision}
    if args.reference_partners is not None:
        options["reference_partners"] = args.reference_partners
    if args.entropy_coding is not None:
        options["entropy_coding"] = args.entropy_coding
    if variant == "ours":
        return AveragingSpec(period_s=args.period, timeout_s=10, codec="8bit", staleness_scaling=True, **options)
    if variant == "no_dc":
        return AveragingSpec(period_s=args.period, timeout_s=10, codec="8bit", rule="overwrite",
                             staleness_scaling=False, **options)
    if variant == "gossip_fp32":
        return AveragingSpec(period_s=args.period, timeout_s=10, codec="none", staleness_scaling=True)
    return None


def batch_seed(seed: int, rank: int) -> int:
    """The Trainer seed (batch order) of peer ``rank``: the same in every variant."""
    return 1000 * (seed + 1) + rank


def build(manifest):
    """(model, experts, every trained parameter): the demo's model with all experts local."""
    from swarmtrain.expert_pool.dispatch import LocalDispatcher
    from swarmtrain.expert_pool.expert import make_expert
    from swarmtrain.peer.model import SwarmModel

    spec = manifest.model
    experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}
    model = SwarmModel(manifest, LocalDispatcher(experts))
    params = list(model.parameters()) + [p for uid in sorted(experts) for p in experts[uid].parameters()]
    return model, experts, params


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the demo's children: no spinning OpenMP waits
    import torch

    torch.set_num_threads(1)
    manifest = make_manifest(args)
    batch = manifest.training.batch_size
    steps = math.ceil(args.samples / (batch * len(manifest.modalities)))
    samples = steps * batch * len(manifest.modalities)
    evaluator = Evaluator(manifest, args)
    initial = evaluator.loss(evaluator.initial)
    config = dict(vars(args), steps=steps, samples=samples, batch_per_modality=batch, lr=manifest.optimizer.lr,
                  params=evaluator.initial.numel(), initial_val_loss=initial, cpus=os.cpu_count())
    print(f"config: {json.dumps(config)}", flush=True)
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    with Peers(args) as peers:
        for repeat in range(args.repeats):  # variants alternate, so a change of the machine's load hits them alike
            for variant in args.variants:
                if variant == "gossip_fp32" and repeat > 0:
                    continue  # there for float32's bytes per exchange, which do not depend on the batches
                reports, wall = peers.run(variant, args.seed + repeat, steps)
                runs[variant].append(summarize(variant, reports, wall, evaluator))
                label = variant if args.repeats == 1 else f"{variant} (run {repeat + 1}, seed {args.seed + repeat})"
                print(label, json.dumps(runs[variant][-1]), flush=True)
    results = {variant: medians(summaries) for variant, summaries in runs.items()}

    out: dict = {"samples": samples}
    for variant in VARIANTS:
        if variant in results:
            out[f"{variant}_val_loss"] = results[variant]["val_loss_peers_mean"]
            out[f"{variant}_val_loss_mean_model"] = results[variant]["val_loss_mean_model"]
    for variant in GOSSIP:
        if variant in results:
            out[f"{variant}_bytes_per_peer"] = results[variant]["bytes_per_peer"]
            out[f"{variant}_bytes_per_exchange"] = results[variant]["bytes_per_exchange"]
            out[f"{variant}_exchanges_per_peer"] = results[variant]["exchanges_per_peer"]
    goals = {}
    if "ours" in results:
        # float32 traffic of ours' own schedule (its exchanges per peer), at the bytes per exchange measured by the
        # gossip_fp32 variant (float32 on the wire, same protocol); without that variant, 8 bytes per element
        if "gossip_fp32" in results:
            out["fp32_bytes_per_exchange"] = results["gossip_fp32"]["bytes_per_exchange"]
            out["fp32_bytes_source"] = "gossip_fp32's measured bytes per exchange x ours' exchanges per peer"
        else:
            out["fp32_bytes_per_exchange"] = 8.0 * evaluator.initial.numel()
            out["fp32_bytes_source"] = "estimated: 4 bytes per element each way x ours' exchanges per peer"
        out["fp32_bytes_per_peer"] = out["fp32_bytes_per_exchange"] * out["ours_exchanges_per_peer"]
        fp32 = out["fp32_bytes_per_peer"]
        goals["traffic_ratio"] = out["ours_bytes_per_peer"] / fp32 if fp32 else None
        goals["traffic_at_most_quarter"] = goals["traffic_ratio"] is not None and goals["traffic_ratio"] <= 0.25
    if "sync" in results and "ours" in results:
        goals["ours_vs_sync"] = out["ours_val_loss"] / out["sync_val_loss"] - 1
        goals["ours_within_3pct_of_sync"] = goals["ours_vs_sync"] <= 0.03
        goals["ours_mean_model_vs_sync"] = out["ours_val_loss_mean_model"] / out["sync_val_loss"] - 1
    for other in ("no_dc", "no_avg"):
        if other in results and "ours" in results:
            goals[f"ours_better_than_{other}"] = out["ours_val_loss"] < out[f"{other}_val_loss"]
    if args.repeats > 1:  # the same seeds (batch orders) in every variant: compare run by run too
        def per_seed(variant: str) -> list[float]:
            return [r["val_loss_peers_mean"] for r in runs.get(variant, [])]

        ours = per_seed("ours")
        if ours and "sync" in runs:
            goals["ours_vs_sync_per_seed"] = [o / s - 1 for o, s in zip(ours, per_seed("sync"))]
        for other in ("no_dc", "no_avg"):
            if ours and other in runs:
                wins = sum(o < x for o, x in zip(ours, per_seed(other)))
                goals[f"ours_better_than_{other}_seeds"] = f"{wins}/{min(len(ours), len(runs[other]))}"
    out.update(initial_val_loss=initial, goals=goals, config=config, variants=results)
    print(json.dumps(out), flush=True)


class Peers:
    """N worker processes, one per peer rank, started once and reused for every run (imports and data loading
    happen once). Each run builds everything that matters afresh in each worker: model, optimizer, trainer,
    and the variant's swarm node + averager or torch.distributed group, torn down again after the run."""

    def __init__(self, args):
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []

    def __enter__(self) -> "Peers":
        for rank in range(self.args.peers):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=worker_main, args=(child, rank, self.args))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for rank, conn in enumerate(self.conns):
            receive(conn, 300, f"peer {rank} did not start")
        return self

    def __exit__(self, *exc) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(None)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            proc.join(max(1.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()

    def run(self, variant: str, seed: int, steps: int) -> tuple[list[dict], float]:
        """One run of ``variant``: every peer trains ``steps`` steps; their reports and the wall time."""
        job = dict(variant=variant, seed=seed, steps=steps, initial_peers=[],
                   port=free_port() if variant == "sync" else 0)
        if variant in GOSSIP:  # the others join the swarm through peer 0's node
            self.conns[0].send(job)
            job["initial_peers"] = receive(self.conns[0], 180, f"{variant}: peer 0 did not get ready")
            ranks = range(1, len(self.conns))
        else:  # gloo's rendezvous needs every rank at once
            ranks = range(len(self.conns))
        for rank in ranks:
            self.conns[rank].send(job)
        for rank in ranks:
            receive(self.conns[rank], 180, f"{variant}: peer {rank} did not get ready")
        started = time.monotonic()
        for conn in self.conns:
            conn.send("go")
        reports = [receive(conn, self.args.timeout, f"a {variant} peer did not finish") for conn in self.conns]
        wall = time.monotonic() - started
        for conn in self.conns:  # until now the others could still exchange with a peer that had finished
            conn.send("teardown")
        for rank, conn in enumerate(self.conns):
            receive(conn, 120, f"{variant}: peer {rank} did not tear down")
        log(f"{variant} (seed {seed}): trained {wall:.1f} s, torn down after {time.monotonic() - started - wall:.1f} s")
        return reports, wall


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def receive(conn, timeout: float, what: str):
    if not conn.poll(timeout):
        raise RuntimeError(what)
    message = conn.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"{what}: {message['error']}")
    return message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_main(conn, rank: int, args) -> None:
    """A peer process: load the data once, then run the jobs the parent sends until it sends None."""
    try:
        import torch

        from swarmtrain.peer.data import DataSource

        torch.set_num_threads(1)
        manifest = make_manifest(args)
        data = DataSource.builtin(manifest, manifest.modalities, rank, args.peers)  # the demo's shard i/N
        conn.send("ready")
        while (job := conn.recv()) is not None:
            run_job(conn, rank, args, manifest, data, job)
    except Exception as e:
        import traceback

        traceback.print_exc()
        with contextlib.suppress(Exception):
            conn.send({"error": f"{type(e).__name__}: {e}"})


def run_job(conn, rank: int, args, manifest, data, job: dict) -> None:
    import torch

    from swarmtrain.peer.trainer import Trainer, build_optimizer

    variant = job["variant"]
    model, _, params = build(manifest)
    optimizer = build_optimizer(params, manifest.optimizer)
    lock = threading.Lock()
    spec = averaging_spec(args, variant)
    node = averager = identity = None
    taus: list[int] = []
    if variant == "sync":
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=rank,
                                world_size=args.peers, timeout=datetime.timedelta(seconds=120))
        optimizer = AllReduceGradients(optimizer, params, args.peers)
        conn.send([])
    elif spec is not None:
        from swarmtrain.averaging.gossip import GossipAverager
        from swarmtrain.dht.directory import SwarmDirectory
        from swarmtrain.dht.identity import Identity
        from swarmtrain.dht.node import SwarmNode

        identity = Identity.load_or_create(None)
        node = SwarmNode(RUN_ID, identity, initial_peers=job["initial_peers"], host_maddrs=LOCAL)
        averager = GossipAverager(node, SwarmDirectory(node.dht, RUN_ID, node.peer_id), [p.data for p in params],
                                  lock, spec, group="replicated", seed=rank)
        taus = record_staleness(averager)
        conn.send(node.visible_maddrs())
    else:
        conn.send([])
    trainer = Trainer(model, data, optimizer, lock, averager, manifest.training.batch_size,
                      batch_seed(job["seed"], rank), torch.device("cpu"))
    assert conn.recv() == "go"
    started = time.monotonic()
    if averager is not None:
        averager.start()  # after "go": no traffic while the peers still hold the identical initial model
    for _ in range(job["steps"]):
        trainer.step()
        if args.step_delay:
            time.sleep(args.step_delay)
    with lock:
        flat = torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()
    # a numpy array, not a tensor: torch would pass a tensor through shared memory and start a torch_shm_manager
    # that inherits this process's sentinel (the parent's join() would then wait for that manager to go away)
    report = {"params": flat, "steps": trainer.stats.steps, "samples": trainer.stats.samples,
              "skipped": trainer.stats.skipped_steps, "wall_s": time.monotonic() - started}
    if averager is not None:
        stats = averager.stats()
        report.update(exchanges=stats.rounds, failures=stats.failures, rejected=stats.rejected,
                      stale_dropped=stats.stale_dropped, busy=stats.busy,
                      bytes=stats.bytes_sent + stats.bytes_received, taus=list(taus))
    conn.send(report)
    assert conn.recv() == "teardown"
    if averager is not None:
        averager.shutdown()
        node.shutdown()
        with contextlib.suppress(FileNotFoundError):  # a throwaway identity may be cleaned up with its node
            os.unlink(identity.path)
    if variant == "sync":
        import torch.distributed as dist

        dist.destroy_process_group()
    conn.send("clean")


def record_staleness(averager) -> list[int]:
    """Measurement only: the staleness ``tau`` (local steps between the initiator's first chunk and its commit)
    of every exchange this peer initiates, read where the averager computes its mixing factor from it."""
    taus: list[int] = []
    commit_factor = averager.replica.commit_factor

    def recording(tau, *rest):
        taus.append(int(tau))
        return commit_factor(tau, *rest)

    averager.replica.commit_factor = recording
    return taus


class AllReduceGradients:
    """An optimizer wrapper for the exact reference: ``step()`` first averages every gradient over all ranks
    (one flat all-reduce), then steps the wrapped optimizer. Every rank applies the same update to the same
    parameters, so the models stay identical (data parallelism with a global batch of N x the local one)."""

    def __init__(self, optimizer, params, world: int):
        self.optimizer, self.params, self.world = optimizer, list(params), world

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        self.optimizer.step()


class Evaluator:
    """Validation loss of a flat parameter vector: ``Trainer.evaluate`` on the fixed held-out split."""

    def __init__(self, manifest, args):
        import torch

        from swarmtrain.peer.data import DataSource
        from swarmtrain.peer.trainer import Trainer

        self.model, _, self.params = build(manifest)
        self.initial = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        data = DataSource.builtin(manifest, manifest.modalities, 0, args.peers)  # held-out split: the same on all
        self.max_batches = args.val_batches or len(data.validation_batches(manifest.training.batch_size))
        self.trainer = Trainer(self.model, data, None, threading.Lock(), None, manifest.training.batch_size, 0,
                               torch.device("cpu"))

    def loss(self, flat) -> float:
        import torch

        torch.nn.utils.vector_to_parameters(flat, self.params)
        return self.trainer.evaluate(max_batches=self.max_batches)


def medians(summaries: list[dict]) -> dict:
    """One variant over its repeats: the median of every number, plus each run's headline loss."""
    if len(summaries) == 1:
        return summaries[0]
    out = {}
    for key, value in summaries[0].items():
        values = [s[key] for s in summaries]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = statistics.median(values) if numeric else values
    out["val_loss_peers_mean_runs"] = [s["val_loss_peers_mean"] for s in summaries]
    return out


def summarize(variant: str, reports: list[dict], wall: float, evaluator: Evaluator) -> dict:
    import torch

    flats = [torch.from_numpy(r["params"]) for r in reports]
    mean = torch.stack(flats).mean(0)
    own = [evaluator.loss(f) for f in flats]
    out = {
        "val_loss_peers_mean": statistics.mean(own), "val_loss_peers": own,
        "val_loss_mean_model": evaluator.loss(mean),
        "param_spread_rel": max(float((f - mean).norm() / mean.norm()) for f in flats),
        "samples_per_peer": statistics.mean(r["samples"] for r in reports),
        "skipped_steps": sum(r["skipped"] for r in reports),
        "wall_s": wall, "peer_wall_s": statistics.mean(r["wall_s"] for r in reports),
    }
    if "exchanges" in reports[0]:
        taus = [t for r in reports for t in r["taus"]]
        exchanges = statistics.mean(r["exchanges"] for r in reports)
        per_peer = statistics.mean(r["bytes"] for r in reports)
        out.update(
            exchanges_per_peer=exchanges, bytes_per_peer=per_peer,
            # every exchange is counted by both of its peers: bytes of one exchange, both directions
            bytes_per_exchange=per_peer / exchanges if exchanges else 0.0,
            steps_per_exchange=statistics.mean(r["steps"] for r in reports) / exchanges if exchanges else None,
            staleness_mean=statistics.mean(taus) if taus else None, staleness_max=max(taus, default=None),
            stale_share=sum(t > 0 for t in taus) / len(taus) if taus else None,
            failures=sum(r["failures"] for r in reports), rejected=sum(r["rejected"] for r in reports),
            stale_dropped=sum(r["stale_dropped"] for r in reports), busy=sum(r["busy"] for r in reports),
        )
    return out


if __name__ == "__main__":
    main()
