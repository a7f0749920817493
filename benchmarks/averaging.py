#!/usr/bin/env python
"""Averaging benchmark: our GossipAverager (8-bit) vs. hivemind 1.1.12 DecentralizedAverager (blockwise 8-bit).

All in ONE run on 127.0.0.1. For N in ``--peers`` (default 2 4) and numel in ``--sizes`` (default 1M 10M), N peer
processes per system, each holding a different random float32 vector (``randn``, seeded per peer):

* ``hivemind``: one ``hivemind.DHT`` + ``DecentralizedAverager`` per process, ``BlockwiseQuantization``
  compression (made to work on NumPy >= 2.4 by the shim of /work/shared/anchors/_hm_compat.py, re-implemented
  below: hivemind's header read ``int(np.frombuffer(..., count=1))`` gets a 0-d array), ``target_group_size =
  min_group_size = N``, ``min_matchmaking_time`` 2 s, ``request_timeout`` 1 s (the anchor's settings). A round:
  reset every vector, all peers call ``step()`` at once; time = until the last peer's step returned.
* ``ours``: one ``SwarmNode`` + ``GossipAverager`` (codec ``8bit``, blocksize 4096, and unless
  ``--error-feedback`` / ``--adaptive-precision`` are given with both manifest options off: every value and every
  answer travels as 8 bits, ~1.01 bytes per element; for averaging *static* tensors the error-feedback residuals
  only add noise, since push-sum already keeps the swarm's mass exact, and float16 values cost 2 bytes) per
  process; the manifest's ``entropy_coding`` (lossless zstd on the 8-bit messages, ~0.89 bytes per element) and
  ``reference_partners`` (8-bit differences from references shared with earlier partners) as by default unless
  ``--no-entropy-coding`` / ``--reference-partners`` say otherwise. A round: a fresh
  averaging group, every vector reset, then each peer runs exchanges back to back (``average_once``) until told
  to stop; time = until every peer is within rel. L2 ``--target`` (1.5%) of the exact mean (each peer reports its
  error after every exchange it takes part in).

Rounds of the two systems alternate (ours, hivemind, ours, ...) so that drifting machine load hits both alike;
one untimed warm-up round of each comes first. At N=4 one hivemind 8-bit all-reduce ends about 3% from the mean
(each value is quantized twice, and the mean's norm is half a peer's), so it never meets the 1.5% target; its time
per all-reduce is still reported (and ``speedup_vs_hivemind`` compares against it), and ours is also timed to
``--loose-target`` (3%).
Per config: median time over successful rounds; failed rounds out of ``--rounds`` (hivemind: step raised, or a
peer ended farther than the target from the mean; ours: not within the target after ``--deadline`` s); relative
error; wire bytes from the loopback interface counters (``/proc/net/dev``, which unlike /sys/class/net follows the
network namespace) as (a) bytes per element moved: ``lo / (2 (N-1) numel)`` for hivemind's butterfly all-reduce
(each peer sends and receives (N-1)/N of its vector) and ``lo / (2 numel exchanges)`` for ours (each exchange sends
the vector once each way), and (b) total bytes per peer-element until the target: ``lo / (N numel)``. Run as root
with ``unshare`` available, the benchmark re-executes itself in a private network namespace so those counters see
only its own traffic (``--no-netns`` to skip; then other programs' loopback traffic is counted too).

Also the codec alone on 10M float32: our 8-bit round trip (encode to bytes, decode) vs raw bitsandbytes
quantize_blockwise/dequantize_blockwise vs hivemind's BlockwiseQuantization compress/extract, in MB/s of input.

The LAST line printed is one JSON object: ``{"N4_10M": {"ours_s", "hivemind_s", "speedup_vs_hivemind",
"ours_bytes_per_elem", "ours_rel_err", "ours_failed", "hivemind_failed", ...}, ..., "codec": {...}}``.

Run: ``.venv/bin/python benchmarks/averaging.py [--peers 2 4] [--sizes 1000000 10000000] [--rounds 20]``
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from _children import expect, median, recv  # benchmarks/ is first on sys.path when a benchmark runs

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


# ---- messages between the benchmark and its peer processes ----


@dataclass
class Setup:
    system: str  # "ours" | "hivemind"
    rank: int
    n: int
    numel: int
    initial_peers: list
    chunk_elems: int = 1 << 20
    log_level: str = "WARNING"
    error_feedback: bool = False
    adaptive_precision: bool = False
    entropy_coding: Optional[bool] = None  # None: the manifest default
    reference_partners: Optional[int] = None


@dataclass
class Round:
    index: int


@dataclass
class Go:
    pass


@dataclass
class Stop:
    pass


@dataclass
class Ready:
    rank: int
    maddrs: list


@dataclass
class Result:
    rank: int
    ok: bool
    rel_err: float
    finished_at: float
    error: str = ""
    exchanges: int = 0
    failures: int = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.015, help="rel. L2 distance to the exact mean")
    parser.add_argument("--loose-target", type=float, default=0.03,
                        help="also time ours to this distance (about where one hivemind 8-bit all-reduce ends at N=4)")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds before a round of ours counts failed")
    parser.add_argument("--chunk-elems", type=int, default=1 << 20)
    parser.add_argument("--codec-numel", type=int, default=10_000_000)
    parser.add_argument("--codec-repeats", type=int, default=5)
    parser.add_argument("--skip-hivemind", action="store_true")
    parser.add_argument("--error-feedback", action="store_true",
                        help="ours: carry 8-bit residuals into the next exchange (manifest default; off here, see doc)")
    parser.add_argument("--adaptive-precision", action="store_true",
                        help="ours: float16 values once partners are close (manifest default; off here, see doc)")
    parser.add_argument("--entropy-coding", action=argparse.BooleanOptionalAction, default=None,
                        help="ours: zstd on the 8-bit messages (manifest option averaging.entropy_coding; default: "
                             "the manifest's, on)")
    parser.add_argument("--reference-partners", type=int, default=None,
                        help="ours: manifest option averaging.reference_partners (default: the manifest's, 4)")
    parser.add_argument("--verbose", action="store_true", help="log every failed exchange of our peers")
    parser.add_argument("--no-netns", action="store_true", help="measure on the shared loopback interface")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.no_netns and not args.in_netns and _can_unshare():
        command = " ".join([sys.executable, *map(_quote, sys.argv), "--in-netns"])
        sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {command}"]))
    import multiprocessing as mp

    import numpy as np
    import torch

    import hivemind

    results: dict = {
        "config": {**{k: v for k, v in vars(args).items() if k != "in_netns"}, "private_netns": args.in_netns,
                   "hivemind": hivemind.__version__, "numpy": np.__version__, "torch": torch.__version__},
    }
    print(f"private network namespace: {args.in_netns}", flush=True)
    results["codec"] = codec_benchmark(args.codec_numel, args.codec_repeats)
    print("codec:", json.dumps(results["codec"]), flush=True)
    ctx = mp.get_context("spawn")
    for n in args.peers:
        for numel in args.sizes:
            key = f"N{n}_{_size_name(numel)}"
            results[key] = run_config(ctx, args, n, numel)
            print(key, json.dumps(results[key]), flush=True)
    for key, res in results.items():
        if key.startswith("N") and res.get("speedup_vs_hivemind") is not None:
            print(f"{key}: ours {res['ours_s']:.3f}s to within {args.target:.1%} vs hivemind {res['hivemind_s']:.3f}s "
                  f"per all-reduce -> speedup {res['speedup_vs_hivemind']:.2f}x; bytes/elem moved "
                  f"{res['ours_bytes_per_elem']:.3f} vs {res['hivemind_bytes_per_elem']:.3f}; total bytes/peer-elem "
                  f"{res['ours_total_bytes_per_peer_elem']:.2f} vs {res['hivemind_total_bytes_per_peer_elem']:.2f}; "
                  f"rel err {res['ours_rel_err']:.4f} vs {res['hivemind_rel_err']:.4f}; ours to within "
                  f"{args.loose_target:.0%}: {res['ours_s_to_loose_target']:.3f}s; failed "
                  f"{res['ours_failed']}/{res['rounds']} vs {res['hivemind_failed']}/{res['rounds']} "
                  f"(hivemind raised in {res['hivemind_raised']}, ended within the target in "
                  f"{res['hivemind_within_target']})", flush=True)
    c = results["codec"]
    print(f"codec: ours {c['ours_MBps']:.0f} MB/s = {c['ours_vs_raw_bnb']:.2f}x raw bitsandbytes "
          f"({c['raw_bnb_MBps']:.0f} MB/s), {c['ours_vs_hivemind']:.2f}x hivemind BlockwiseQuantization "
          f"({c['hivemind_MBps']:.0f} MB/s)", flush=True)
    print(json.dumps(results), flush=True)


def run_config(ctx, args, n: int, numel: int) -> dict:
    systems = ["ours"] + ([] if args.skip_hivemind else ["hivemind"])
    level = "DEBUG" if args.verbose else "WARNING"
    peers = {system: start_peers(ctx, system, n, numel, args.chunk_elems, level, args) for system in systems}
    rounds: dict[str, list] = {system: [] for system in systems}
    try:
        for system in systems:  # one untimed warm-up round each (first matchmaking, first connections, imports)
            (round_ours if system == "ours" else round_hivemind)(peers[system], -1, n, numel, args)
        for index in range(args.rounds):
            for system in systems:
                run = round_ours if system == "ours" else round_hivemind
                record = run(peers[system], index, n, numel, args)
                rounds[system].append(record)
                print(f"  N={n} numel={numel} {system} round {index}: {json.dumps(record)}", flush=True)
    finally:
        for system in systems:
            stop_peers(peers[system])
    out = {"rounds": args.rounds, "target": args.target}
    for system in systems:
        # ours: rounds that reached the target; hivemind: rounds whose all-reduce ran (a round counts as failed
        # if it raised *or* ended farther than the target from the mean, but its time is still its time)
        timed = [r for r in rounds[system] if (r["ok"] if system == "ours" else not r.get("errors"))]
        out[f"{system}_failed"] = sum(not r["ok"] for r in rounds[system])
        out[f"{system}_s"] = median([r["time_s"] for r in timed])
        out[f"{system}_rel_err"] = median([r["rel_err"] for r in rounds[system]])
        out[f"{system}_bytes_per_elem"] = median([r.get("bytes_per_elem") for r in timed])
        out[f"{system}_total_bytes_per_peer_elem"] = median([r.get("total_bytes_per_peer_elem") for r in timed])
    out["ours_exchanges"] = median([r["exchanges"] for r in rounds["ours"] if r["ok"]])
    out["ours_s_to_loose_target"] = median([r["loose_time_s"] for r in rounds["ours"]])
    out["loose_target"] = args.loose_target
    if "hivemind" in rounds:
        out["hivemind_raised"] = sum(bool(r.get("errors")) for r in rounds["hivemind"])
        out["hivemind_within_target"] = sum(r["ok"] for r in rounds["hivemind"])
    if out.get("hivemind_s") and out.get("ours_s"):
        out["speedup_vs_hivemind"] = out["hivemind_s"] / out["ours_s"]
    else:
        out["speedup_vs_hivemind"] = None
    return out


def round_ours(peers, index: int, n: int, numel: int, args) -> dict:
    conns, reports, procs = peers
    for conn in conns:
        conn.send(Round(index))
    for conn, proc in zip(conns, procs):
        expect(recv(conn, proc), Ready)
    start_bytes, started = lo_bytes(), time.monotonic()
    for conn in conns:
        conn.send(Go())
    latest: dict[int, tuple] = {}
    converged_at, end_bytes, loose_at = None, None, None
    while time.monotonic() - started < args.deadline:
        if not reports.poll(0.05):
            continue
        rank, at, err, exchanges, failures = reports.recv()
        latest[rank] = (at, err, exchanges, failures)
        if loose_at is None and len(latest) == n and all(e <= args.loose_target for _, e, _, _ in latest.values()):
            loose_at = max(a for a, _, _, _ in latest.values())
        if len(latest) == n and all(e <= args.target for _, e, _, _ in latest.values()):
            converged_at, end_bytes = max(a for a, _, _, _ in latest.values()), lo_bytes()
            break
    for conn in conns:
        conn.send(Stop())
    results = [expect(recv(conn, proc), Result) for conn, proc in zip(conns, procs)]
    while reports.poll(0):
        reports.recv()  # reports sent after the stop
    ok = converged_at is not None
    exchanges = sum(x for _, _, x, _ in latest.values())
    record = {"ok": ok, "time_s": (converged_at - started) if ok else None,
              "loose_time_s": (loose_at - started) if loose_at is not None else None,
              "rel_err": max(e for _, e, _, _ in latest.values()) if latest else None, "exchanges": exchanges,
              "exchange_failures": sum(f for _, _, _, f in latest.values()),
              "exchange_failures_incl_stop": sum(r.failures for r in results)}
    if ok and end_bytes is not None and start_bytes is not None:
        record["bytes_per_elem"] = (end_bytes - start_bytes) / (2 * numel * max(1, exchanges))
        record["total_bytes_per_peer_elem"] = (end_bytes - start_bytes) / (n * numel)
    return record


def round_hivemind(peers, index: int, n: int, numel: int, args) -> dict:
    conns, _, procs = peers
    for conn in conns:
        conn.send(Round(index))
    for conn, proc in zip(conns, procs):
        expect(recv(conn, proc), Ready)
    start_bytes, started = lo_bytes(), time.monotonic()
    for conn in conns:
        conn.send(Go())
    results = [expect(recv(conn, proc), Result) for conn, proc in zip(conns, procs)]
    end_bytes = lo_bytes()
    errors = [r.error for r in results if r.error]
    rel_err = max(r.rel_err for r in results)
    ok = not errors and rel_err <= args.target
    record = {"ok": ok, "time_s": max(r.finished_at for r in results) - started, "rel_err": rel_err,
              "errors": errors[:2]}
    if start_bytes is not None and not errors:
        record["bytes_per_elem"] = (end_bytes - start_bytes) / (2 * (n - 1) * numel)
        record["total_bytes_per_peer_elem"] = (end_bytes - start_bytes) / (n * numel)
    return record


# ---- peer processes ----


def start_peers(ctx, system: str, n: int, numel: int, chunk_elems: int, log_level: str, args):
    reports_out, reports_in = None, None
    if system == "ours":
        reports_in, reports_out = ctx.Pipe(duplex=False)
    conns, procs, maddrs = [], [], []
    for rank in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=peer_main, args=(child, reports_out))  # not daemonic: it starts p2pd and DHTs
        proc.start()
        parent.send(Setup(system, rank, n, numel, maddrs, chunk_elems, log_level, args.error_feedback,
                          args.adaptive_precision, args.entropy_coding, args.reference_partners))
        ready = expect(recv(parent, proc), Ready)
        if rank == 0:
            maddrs = ready.maddrs
        conns.append(parent)
        procs.append(proc)
    return conns, reports_in if system == "ours" else None, procs


def stop_peers(peers) -> None:
    conns, _, procs = peers
    for conn in conns:
        try:
            conn.send(None)
        except OSError:
            pass
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def peer_main(conn, reports) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    setup: Setup = conn.recv()
    logging.basicConfig(format=f"peer {setup.system}/{setup.rank} %(asctime)s %(name)s: %(message)s")
    logging.getLogger("swarmtrain").setLevel(setup.log_level)
    gen = torch.Generator().manual_seed(1234)
    vectors = [torch.randn(setup.numel, generator=gen) for _ in range(setup.n)]  # every peer's, for the mean
    original, mean = vectors[setup.rank], torch.stack(vectors).mean(0)
    del vectors
    if setup.system == "ours":
        peer = OursPeer(setup, original, mean, conn, reports)
    else:
        peer = HivemindPeer(setup, original, mean, conn)
    try:
        while (message := conn.recv()) is not None:
            peer.handle(message)
    finally:
        peer.close()


class OursPeer:
    """One peer of ours: a SwarmNode and, per round, a fresh GossipAverager exchanging back to back."""

    def __init__(self, setup: Setup, original, mean, conn, reports):
        from swarmtrain.dht.directory import SwarmDirectory
        from swarmtrain.dht.identity import Identity
        from swarmtrain.dht.node import SwarmNode

        self.setup, self.original, self.mean, self.conn, self.reports = setup, original, mean, conn, reports
        self.mean_norm = float(mean.norm())
        self.identity = Identity.load_or_create(None)
        self.node = SwarmNode("avgbench", self.identity, initial_peers=setup.initial_peers, host_maddrs=LOCAL)
        self.directory = SwarmDirectory(self.node.dht, "avgbench", self.node.peer_id)
        self.params = [original.clone()]
        self.averager = None
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        conn.send(Ready(setup.rank, self.node.visible_maddrs()))

    def handle(self, message) -> None:
        from swarmtrain.averaging.gossip import GossipAverager
        from swarmtrain.dht.records import AveragingSpec

        if isinstance(message, Round):
            options = {"entropy_coding": self.setup.entropy_coding,
                       "reference_partners": self.setup.reference_partners}
            spec = AveragingSpec(period_s=3600, timeout_s=30, codec="8bit", chunk_elems=self.setup.chunk_elems,
                                 error_feedback=self.setup.error_feedback,
                                 adaptive_precision=self.setup.adaptive_precision,
                                 **{name: value for name, value in options.items() if value is not None})
            self.params[0].copy_(self.original)
            self.lock = threading.Lock()
            self.averager = GossipAverager(self.node, self.directory, self.params, self.lock, spec,
                                           group=f"bench{message.index}", seed=self.setup.rank)
            self.averager.start()
            deadline = time.monotonic() + 30
            while len(self.averager.node.loop.run(self.averager.rendezvous.partners(
                    self.averager.group, fresh=True))) < self.setup.n - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            self.conn.send(Ready(self.setup.rank, []))
        elif isinstance(message, Go):
            self.stop.clear()
            self.threads = [threading.Thread(target=self._exchange_loop), threading.Thread(target=self._monitor)]
            for thread in self.threads:
                thread.start()
        elif isinstance(message, Stop):
            self.stop.set()
            for thread in self.threads:
                thread.join()
            stats = self.averager.stats()
            self.averager.shutdown()
            with self.lock:
                err = float((self.params[0] - self.mean).norm()) / self.mean_norm
            self.conn.send(Result(self.setup.rank, True, err, time.monotonic(), exchanges=stats.rounds - stats.served,
                                  failures=stats.failures + stats.rejected))

    def _exchange_loop(self) -> None:
        import random

        rng = random.Random(self.setup.rank)
        while not self.stop.is_set():
            if self.averager.average_once() in ("busy", "unchanged", "alone"):
                time.sleep(rng.uniform(0.001, 0.01))  # jitter, so that two peers calling each other desynchronize

    def _monitor(self) -> None:
        seen = -1
        while not self.stop.is_set():
            stats = self.averager.stats()
            if stats.rounds != seen:
                seen = stats.rounds
                with self.lock:
                    err = float((self.params[0] - self.mean).norm()) / self.mean_norm
                self.reports.send((self.setup.rank, time.monotonic(), err, stats.rounds - stats.served,
                                   stats.failures + stats.rejected))
            time.sleep(0.002)

    def close(self) -> None:
        if self.averager is not None:
            self.averager.shutdown()
        self.node.shutdown()
        with contextlib.suppress(FileNotFoundError):  # a throwaway identity may be cleaned up with its node
            os.unlink(self.identity.path)


class HivemindPeer:
    """One peer of hivemind: a DHT and a DecentralizedAverager with BlockwiseQuantization."""

    def __init__(self, setup: Setup, original, mean, conn):
        import hivemind
        from hivemind.averaging import DecentralizedAverager
        from hivemind.compression import BlockwiseQuantization

        import multiprocessing

        multiprocessing.set_start_method("fork", force=True)  # hivemind's processes are forked (as it expects)
        apply_numpy24_shim()  # before the averager process forks off, so it inherits the patch
        self.setup, self.original, self.mean, self.conn = setup, original, mean, conn
        self.mean_norm = float(mean.norm())
        self.dht = hivemind.DHT(initial_peers=setup.initial_peers, host_maddrs=LOCAL, start=True)
        n = setup.n
        self.averager = DecentralizedAverager(
            [original.clone()], dht=self.dht, prefix="avgbench", compression=BlockwiseQuantization(),
            target_group_size=n, min_group_size=n, min_matchmaking_time=2.0, request_timeout=1.0,
            allreduce_timeout=120, start=True,
        )
        conn.send(Ready(setup.rank, [str(m) for m in self.dht.get_visible_maddrs()]))

    def handle(self, message) -> None:
        if isinstance(message, Round):
            with self.averager.get_tensors() as tensors:
                tensors[0].copy_(self.original)
            self.conn.send(Ready(self.setup.rank, []))
        elif isinstance(message, Go):
            error = ""
            try:
                self.averager.step(timeout=120)
            except BaseException as e:  # noqa: BLE001 - reported, the round counts as failed
                error = f"{type(e).__name__}: {e}"
            finished = time.monotonic()
            with self.averager.get_tensors() as tensors:
                err = float((tensors[0] - self.mean).norm()) / self.mean_norm
            self.conn.send(Result(self.setup.rank, not error, err, finished, error=error))

    def close(self) -> None:
        self.averager.shutdown()
        self.dht.shutdown()


# ---- the codec alone ----


def codec_benchmark(numel: int, repeats: int) -> dict:
    import torch
    from hivemind.compression import BlockwiseQuantization, CompressionInfo

    from swarmtrain.averaging.blockwise import Scratch
    from swarmtrain.averaging.codec import decode, encode

    apply_numpy24_shim()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    raw_code = None

    scratch, out = Scratch(), torch.empty(numel)

    def ours():  # as exchanges call it: their norm pass doubles as the finiteness check, buffers are reused
        message, _ = encode(x, "8bit", 4096, with_decoded=False, check_finite=False, scratch=scratch)
        return decode(message, numel, 4096, out=out)[0]

    def ours_checked():  # encode() on its own, with its separate finiteness pass
        message, _ = encode(x, "8bit", 4096, with_decoded=False)
        return decode(message, numel, 4096)[0]

    def ours_with_sender_copy():  # what an exchange does: the sender also keeps what the receiver decodes
        message, _ = encode(x, "8bit", 4096, with_decoded=True, check_finite=False, scratch=scratch)
        return decode(message, numel, 4096, out=out)[0]

    entropy_bytes = []

    def ours_entropy():  # plus the lossless zstd stage (averaging.entropy_coding)
        message, _ = encode(x, "8bit", 4096, with_decoded=False, check_finite=False, scratch=scratch, entropy=True)
        entropy_bytes.append(len(message.buffer))
        return decode(message, numel, 4096, out=out)[0]

    def raw():
        codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default(x, raw_code, 4096)
        return torch.ops.bitsandbytes.dequantize_blockwise.default(codes, absmax, raw_code, 4096, torch.float32)

    hm_codec, info = BlockwiseQuantization(), CompressionInfo.from_tensor(x)

    def hm():
        return hm_codec.extract(hm_codec.compress(x, info))

    import bitsandbytes.functional as bnb_functional

    raw_code = bnb_functional.create_dynamic_map()
    methods = {"ours": ours, "ours_checked": ours_checked, "ours_with_sender_copy": ours_with_sender_copy,
               "ours_entropy": ours_entropy, "raw_bnb": raw, "hivemind": hm}
    times: dict[str, list] = {name: [] for name in methods}
    errors = {name: float((fn() - x).norm() / x.norm()) for name, fn in methods.items()}  # also warms up
    for _ in range(repeats):  # round-robin, so load drift hits all alike
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    mbps = {name: numel * 4 / 1e6 / statistics.median(ts) for name, ts in times.items()}
    return {
        "numel": numel, "torch_threads": torch.get_num_threads(),
        **{f"{name}_MBps": value for name, value in mbps.items()},
        **{f"{name}_rel_err": value for name, value in errors.items()},
        "ours_vs_raw_bnb": mbps["ours"] / mbps["raw_bnb"], "ours_vs_hivemind": mbps["ours"] / mbps["hivemind"],
        "ours_entropy_bytes_per_elem": entropy_bytes[-1] / numel,
    }


def apply_numpy24_shim() -> bool:
    """hivemind 1.1.12 reads its 8-bit header with ``int(np.frombuffer(buf, count=1, dtype=np.int64))``, a
    TypeError on NumPy >= 2.4; give that one call a 0-d array (the idea of anchors/_hm_compat.py)."""
    import numpy as np

    import hivemind.compression.quantization as quantization

    try:
        int(np.zeros(1, dtype=np.int64))
        return False
    except TypeError:
        pass
    if getattr(quantization.np, "_swarmtrain_shim", False):
        return False

    class _NumpyShim:
        _swarmtrain_shim = True

        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def frombuffer(*args, **kwargs):
            array = np.frombuffer(*args, **kwargs)
            if kwargs.get("count") == 1 and np.dtype(kwargs.get("dtype", float)) == np.int64:
                return array.reshape(())
            return array

    quantization.np = _NumpyShim()
    return True


# ---- helpers ----


def lo_bytes() -> Optional[int]:
    """Bytes sent on the loopback interface of this network namespace so far."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                return int(data.split()[8])
    return None


def _can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)





def _size_name(numel: int) -> str:
    return f"{numel // 1_000_000}M" if numel % 1_000_000 == 0 else str(numel)


if __name__ == "__main__":
    main()
