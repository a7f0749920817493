#!/usr/bin/env python
"""Convergence benchmark: does gossip averaging make N peers that each see a skewed slice of the data train one
good model? All on 127.0.0.1, real peer processes (SwarmNode + GossipAverager + a local Adam loop each).

Task: scikit-learn's digits (1,797 8x8 scans, bundled, no download), an MLP 64-256-256-10, 25% held out for
validation. The training set is sorted by label and cut into N contiguous shards, so each peer sees only about
10/N of the classes (strongly non-IID: a peer alone cannot learn the others). Every variant runs the same number
of local steps (``--steps``, batch ``--batch``, ``--step-delay`` s of pause after each, standing in for a real
step's time) from the same initial model:

* ``centralized``: one process, batch N x ``--batch`` over all the training data (the data-parallel ideal);
* ``independent``: N peers, no averaging (what each slice alone gives);
* ``gossip_<codec>`` for each codec in ``--codecs`` (default none 8bit): N peers averaging every ``--period`` s;
* ``diloco_8bit``: N peers, ``mode="diloco"`` (pair averages feed an outer Nesterov step; lr 0.7, momentum 0.9).

Reported per variant: validation loss and accuracy of the peers' mean model and the mean of the peers' own
accuracies, the spread of the peers around their mean (relative L2 of the parameters), wall time, exchanges and
averaging bytes per peer. The LAST line printed is one JSON object ``{"variants": {name: {...}}, "config": {...}}``.

Run: ``.venv/bin/python benchmarks/convergence.py [--peers 4] [--steps 1500] [--period 0.05]``
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import threading
import time

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--period", type=float, default=0.05, help="averaging period of each peer (s)")
    parser.add_argument("--step-delay", type=float, default=0.005,
                        help="pause after each local step (s), standing in for the time a real step takes")
    parser.add_argument("--codecs", nargs="+", default=["none", "8bit"])
    parser.add_argument("--skip-diloco", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    results: dict = {"config": vars(args), "variants": {}}
    train, val = load_data(args.seed)
    started = time.monotonic()
    model = make_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = train
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):  # centralized baseline, in this process
        idx = torch.randint(0, len(y), (args.batch * args.peers,), generator=gen)
        train_step(model, opt, x[idx], y[idx])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    results["variants"]["centralized"] = summarize([flat], val, args, time.monotonic() - started, [])
    print("centralized", json.dumps(results["variants"]["centralized"]), flush=True)

    variants = [("independent", None, "gossip")] + [(f"gossip_{c}", c, "gossip") for c in args.codecs]
    if not args.skip_diloco:
        variants.append(("diloco_8bit", "8bit", "diloco"))
    ctx = mp.get_context("spawn")
    for name, codec, mode in variants:
        results["variants"][name] = run_swarm(ctx, args, codec, mode, val)
        print(name, json.dumps(results["variants"][name]), flush=True)
    print(json.dumps(results), flush=True)


def run_swarm(ctx, args, codec, mode: str, val) -> dict:
    conns, procs, maddrs = [], [], []
    for rank in range(args.peers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=peer_main, args=(child, rank, args, codec, mode, maddrs))
        proc.start()
        if not parent.poll(180):
            raise RuntimeError(f"peer {rank} did not start")
        ready = parent.recv()
        if rank == 0:
            maddrs = ready
        conns.append(parent)
        procs.append(proc)
    started = time.monotonic()
    for conn in conns:
        conn.send("go")
    reports = []
    for conn in conns:
        if not conn.poll(600):
            raise RuntimeError("a peer did not finish")
        reports.append(conn.recv())
    elapsed = time.monotonic() - started
    for conn in conns:
        conn.send("quit")
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return summarize([r["params"] for r in reports], val, args, elapsed, reports)


def peer_main(conn, rank: int, args, codec, mode: str, initial_peers: list) -> None:
    import torch

    torch.set_num_threads(1)
    train, _ = load_data(args.seed)
    x, y = shard(train, rank, args.peers)
    model = make_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    lock = threading.Lock()
    node = averager = identity = None
    if codec is not None:
        from swarmtrain.averaging.gossip import GossipAverager
        from swarmtrain.dht.directory import SwarmDirectory
        from swarmtrain.dht.identity import Identity
        from swarmtrain.dht.node import SwarmNode
        from swarmtrain.dht.records import AveragingSpec

        identity = Identity.load_or_create(None)
        node = SwarmNode("convbench", identity, initial_peers=initial_peers, host_maddrs=LOCAL)
        spec = AveragingSpec(period_s=args.period, timeout_s=10, codec=codec, mode=mode)
        averager = GossipAverager(node, SwarmDirectory(node.dht, "convbench", node.peer_id),
                                  [p.data for p in model.parameters()], lock, spec, group="mlp", seed=rank)
        averager.start()
        conn.send(node.visible_maddrs())
    else:
        conn.send([])
    assert conn.recv() == "go"
    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        train_step(model, opt, x[idx], y[idx], lock)
        if averager is not None:
            averager.on_local_step(step + 1, (step + 1) * args.batch)
        time.sleep(args.step_delay)
    report = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()}
    if averager is not None:
        stats = averager.stats()
        report.update(exchanges=stats.rounds, failures=stats.failures + stats.rejected,
                      bytes=stats.bytes_sent + stats.bytes_received)
    conn.send(report)
    conn.recv()
    if averager is not None:
        averager.shutdown()
        node.shutdown()
        with contextlib.suppress(FileNotFoundError):  # a throwaway identity may be cleaned up with its node
            os.unlink(identity.path)


# ---- task ----


def load_data(seed: int):
    """Digits as float tensors, 75/25 train/validation split (fixed by ``seed``)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def shard(train, rank: int, n: int):
    """Peer ``rank``'s slice of the training set sorted by label (about 10/n classes each)."""
    import torch

    x, y = train
    order = torch.argsort(y, stable=True)
    lo, hi = rank * len(y) // n, (rank + 1) * len(y) // n
    return x[order[lo:hi]], y[order[lo:hi]]


def make_model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )


def train_step(model, opt, x, y, lock=None) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    if lock is None:
        opt.step()
    else:
        with lock:
            opt.step()
    return loss.item()


def summarize(flats: list, val, args, elapsed: float, reports: list) -> dict:
    import torch

    x, y = val
    mean = torch.stack(flats).mean(0)

    def evaluate(flat):
        model = make_model(args.seed)
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
        with torch.no_grad():
            logits = model(x)
        return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    mean_loss, mean_acc = evaluate(mean)
    own = [evaluate(f) for f in flats]
    spread = max(float((f - mean).norm() / mean.norm()) for f in flats)
    out = {"val_loss_of_mean_model": mean_loss, "val_acc_of_mean_model": mean_acc,
           "val_acc_of_peers_mean": statistics.mean(a for _, a in own),
           "val_acc_of_peers_min": min(a for _, a in own), "param_spread_rel": spread, "wall_s": elapsed}
    if reports and "exchanges" in reports[0]:
        out.update(exchanges_per_peer=statistics.mean(r["exchanges"] for r in reports),
                   failures=sum(r["failures"] for r in reports),
                   averaging_MB_per_peer=statistics.mean(r["bytes"] for r in reports) / 1e6)
    return out


if __name__ == "__main__":
    main()
