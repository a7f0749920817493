#!/usr/bin/env python
"""Training-efficiency benchmark: how much of two cores' training throughput survives decentralized averaging.

The model is the demo's: the :class:`~swarmtrain.peer.model.SwarmModel` of the default run manifest (the one
``swarmtrain demo`` / ``swarmtrain coordinator`` use when given no config: hidden 64, 2 layers, 4 text + 4 image
experts per layer, Adam lr 3e-3, batch 16 per modality) with every expert in-process
(:class:`~swarmtrain.expert_pool.dispatch.LocalDispatcher`), so that each process trains the WHOLE model
(replicated parameters and all 16 experts, ~607k parameters) on its own shard of the built-in data
(:class:`~swarmtrain.peer.data.DataSource`; shard ``rank/2``). A "sample" is what the trainer counts
(``Batch.num_samples``: 16 text windows + 16 captioned images per step).

Every process is started pinned to one core (the benchmark sets its own thread's CPU affinity to that core around
``Process.start()``, so the spawned interpreter is pinned from its first instruction; the child re-asserts it
before importing torch) and calls ``torch.set_num_threads(1)``. Everything a peer starts (hivemind's DHT process,
its ``p2pd``, hivemind's forked averager processes) inherits that affinity: it shares the peer's core, as it
would on a volunteer's one-core budget. Each child runs in its own session, which is SIGKILLed at the end of its
run (and checked empty), so no ``p2pd`` survives. Variants, all from fresh processes:

* ``alone``: a plain torch loop (sample, zero_grad, losses, backward, step of the peer's optimizer:
  ``build_optimizer``, i.e. fused Adam), no DHT, no averaging, alone
  on core 0 (``--alone-cores 0 1`` also measures core 1, one at a time).
* ``independent`` (``--variants ... independent``; not run by default, to keep the run short): two such plain
  loops at once on cores 0 and 1: the ceiling of any two-peer system here (shared caches, memory bandwidth, host).
* ``ours``: 2 peers, each a ``SwarmNode`` (127.0.0.1) + ``GossipAverager`` over ALL its parameters (group
  ``replicated``, codec ``8bit``, ``period_s`` ``--period``, timeout 10 s) + :class:`~swarmtrain.peer.trainer.
  Trainer` steps. Each peer starts an exchange every ``period_s`` and serves its partner's, so each averages
  about every ``period_s / 2``; the exchanges a peer took part in during the window are counted (must be > 0,
  else the run is invalid).
* ``hivemind``: 2 peers, each a ``hivemind.DHT`` + ``hivemind.Optimizer(use_local_updates=True)`` around the same
  fused Adam, ``target_batch_size`` = the samples both peers make in ``period_s / 2`` at the alone rate (so its
  epochs, one parameter all-reduce each, come about as often as our exchanges), ``batch_size_per_step`` = 32,
  ``matchmaking_time`` ``--matchmaking-time`` (1.5 s), ``averaging_timeout`` 10 s, ``request_timeout`` 1 s (its
  averager warns unless it is below the matchmaking time), no compression (hivemind 1.1.12's 8-bit
  codecs break on NumPy >= 2.4). hivemind forks its averager processes, so the peer child sets the ``fork`` start
  method before creating its DHT. Epochs (``opt.local_epoch``) in the window are counted.

Peers of a variant start together, train ``--warmup`` s (first connections, first exchanges; 4 s for the plain
loops), then samples are counted over ``--window`` s (from the first step that ends after the window opens to the
first that ends after it closes). ``efficiency = sum of the two peers' samples/s / (2 x alone samples/s)``.
Variants alternate within a repeat and their order rotates between repeats (alone first in the first repeat: its
rate sets hivemind's target); figures are medians over ``--repeats``.

The machine may be shared (other people's jobs on the same two cores). Before each run the benchmark waits up to
``--quiet-wait`` s for both cores to be idle, and every process measures, from ``/proc/stat``, how much of its
core other programs took during the window. ``*_efficiency`` is the plain figure; ``*_efficiency_adjusted``
counts each process's samples per second of core time left to it (``samples / (window - others' CPU on its
core)``), for alone and the swarms alike, so that it compares the systems rather than the neighbours' load.

Where the time goes: each process also reports, for the window, the CPU seconds of its training thread, of its
other threads (named: the node's event loop ``swarmtrain-loop``, the averager's pool ``avg-replicated``, hivemind's
threads), of the processes of its session (the DHT process, p2pd, hivemind's averager process), the core's idle
time, how long its training thread waited for the trainer's lock and how long the averager held it (ours), and the
training thread's CPU per step against its wall time per step. A saturated core gives every CPU second spent on
anything else to the training thread's loss. ``unpinned_processes`` checks that every process of the session was
confined to the peer's core.

The LAST line printed is one JSON object: ``{"alone_sps", "ours_sps", "hivemind_sps", "ours_efficiency",
"hivemind_efficiency", "ours_rounds", "hivemind_epochs", "config", ...}`` (sps: samples/s; ours/hivemind sums
over the two peers; rounds / epochs per peer during the window; all medians over repeats).

Run: ``.venv/bin/python benchmarks/efficiency.py [--repeats 3] [--warmup 10] [--window 30] [--period 2.0]``;
a quick try: ``--repeats 1 --warmup 5 --window 10``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from _children import expect, median, recv  # benchmarks/ is first on sys.path when a benchmark runs

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
RUN_ID = "effbench"
PROBE_S = 2.0  # how often a process checks how much of its core other programs took
QUIET_SHARE = 0.05  # an interval counts as quiet if other programs took at most this share of the core
MIN_QUIET_S = 6.0  # fewer quiet seconds than this in a window: no quiet rate for that process
SHUTDOWN_GRACE_S = 5.0  # after the results: time for a clean shutdown before the sessions are SIGKILLed
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- messages between the benchmark and its processes ----


@dataclass
class Config:
    period_s: float = 2.0
    codec: str = "8bit"
    timeout_s: float = 10.0
    hivemind_target: int = 0
    matchmaking_time: float = 1.5
    averaging_timeout: float = 10.0
    request_timeout: float = 1.0
    log_level: str = "WARNING"


@dataclass
class Setup:
    variant: str  # "alone" | "independent" | "ours" | "hivemind"
    rank: int
    core: int
    initial_peers: list
    config: Config
    run_index: int = 0


@dataclass
class Ready:
    rank: int
    maddrs: list
    error: str = ""


@dataclass
class Go:
    window_start: float  # time.monotonic() (system-wide clock, the same in every process)
    window_end: float


@dataclass
class Stop:
    pass


@dataclass
class Result:
    rank: int
    core: int
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    sps: float = 0.0
    rounds: int = 0  # ours: exchanges this peer took part in (initiated + served); hivemind: epochs
    extra: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)  # CPU seconds in the window by component
    quiet_s: float = 0.0  # seconds of the window in intervals when other programs left this core alone
    quiet_sps: Optional[float] = None  # samples/s over those intervals
    error: str = ""


# ---- the benchmark (parent) ----


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of training before the window (peers)")
    parser.add_argument("--alone-warmup", type=float, default=4.0, help="the same for the plain loops")
    parser.add_argument("--window", type=float, default=30.0, help="seconds over which samples are counted")
    parser.add_argument("--period", type=float, default=2.0, help="ours: averaging.period_s of each peer")
    parser.add_argument("--codec", default="8bit", choices=["none", "fp16", "8bit"])
    parser.add_argument("--hivemind-target", type=int, default=0,
                        help="hivemind target_batch_size (0: samples of both peers in period/2 at the alone rate)")
    parser.add_argument("--matchmaking-time", type=float, default=1.5)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--alone-cores", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["alone", "ours", "hivemind"],
                        choices=["alone", "independent", "ours", "hivemind"])
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="before each run wait up to this many seconds for the machine to be idle (shared box)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark pins its two peers to cores 0 and 1: it needs at least 2 usable cores")
    import multiprocessing as mp

    signal.signal(signal.SIGTERM, _interrupt)
    _quiet_resource_tracker()
    ctx = mp.get_context("spawn")
    cfg = Config(period_s=args.period, codec=args.codec, timeout_s=10.0, hivemind_target=args.hivemind_target,
                 matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
                 log_level=args.log_level)
    variants = list(dict.fromkeys(args.variants))
    if "alone" in variants:
        variants.remove("alone")
        variants.insert(0, "alone")
    runs: dict[str, list] = {v: [] for v in variants}
    started = time.monotonic()
    print(f"efficiency benchmark: variants {variants}, {args.repeats} repeats, warm-up {args.warmup} s "
          f"(plain loops {args.alone_warmup} s), window {args.window} s, ours period {args.period} s codec "
          f"{args.codec}; load average {os.getloadavg()[0]:.2f}", flush=True)
    run_index = 0
    for repeat in range(args.repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant == "hivemind" and not cfg.hivemind_target:
                alone = [r["sps"] for r in runs.get("alone", [])] or [None]
                if alone[0] is None:
                    raise SystemExit("hivemind's target_batch_size comes from the alone rate: run 'alone' too, "
                                     "or give --hivemind-target")
                cfg.hivemind_target = max(32, int(round(2 * alone[0] * args.period / 2 / 32)) * 32)
                print(f"hivemind target_batch_size = {cfg.hivemind_target} (both peers' samples in "
                      f"{args.period / 2:.2f} s at the alone rate {alone[0]:.0f}/s)", flush=True)
            cores_list = [[c] for c in args.alone_cores] if variant == "alone" else [[0, 1]]
            for cores in cores_list:
                run_index += 1
                warmup = args.alone_warmup if variant in ("alone", "independent") else args.warmup
                busy = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
                record = run_variant(ctx, variant, cores, cfg, warmup, args.window, run_index)
                record["busy_before"] = busy
                runs[variant].append(record)
                print(f"[{time.monotonic() - started:5.0f}s] repeat {repeat} {variant} cores {cores}: "
                      f"{_describe(record)}", flush=True)
    summary = summarize(runs, args, cfg, time.monotonic() - started)
    print_summary(summary)
    print(json.dumps(summary), flush=True)


def run_variant(ctx, variant: str, cores: list, cfg: Config, warmup: float, window: float, run_index: int) -> dict:
    """Start one process per core, wait until all are ready, train warm-up + window, collect results, clean up."""
    procs, conns, sockets = [], [], []
    load_before, started = os.getloadavg()[0], time.monotonic()
    try:
        for rank, core in enumerate(cores):
            parent, child = ctx.Pipe()
            proc = _start_pinned(ctx, core, child)
            procs.append(proc)
            conns.append(parent)
        maddrs: list = []
        for rank, (core, conn, proc) in enumerate(zip(cores, conns, procs)):
            conn.send(Setup(variant, rank, core, maddrs, cfg, run_index))
            if variant in ("ours", "hivemind") and rank == 0:  # the others bootstrap from the first one
                ready = _expect(recv(conn, proc, 180), Ready)
                maddrs = ready.maddrs
        for rank, (conn, proc) in enumerate(zip(conns, procs)):
            if variant in ("ours", "hivemind") and rank == 0:
                continue
            _expect(recv(conn, proc, 180), Ready)
        if variant == "ours":  # every peer sees its partner in the rendezvous record before the clock starts
            for conn in conns:
                conn.send("wait_partners")
            for conn, proc in zip(conns, procs):
                _expect(recv(conn, proc, 60), Ready)
        now = time.monotonic()
        startup_s = now - started
        go = Go(now + 0.5 + warmup, now + 0.5 + warmup + window)
        for conn in conns:
            conn.send(go)
        results = [_expect(recv(conn, proc, warmup + window + 120), Result) for conn, proc in zip(conns, procs)]
        sockets = _p2pd_sockets([p.pid for p in procs])  # hivemind leaves some behind even on a clean exit
        stopping = time.monotonic()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(Stop())
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        shutdown_s = time.monotonic() - stopping
    finally:
        killed, surviving = _kill_sessions([p.pid for p in procs if p.pid is not None], sockets)
        for proc in procs:
            proc.join(5)
    errors = [r.error for r in results if r.error]
    record = {
        "variant": variant, "cores": cores, "sps": sum(r.sps for r in results),
        "per_peer_sps": [r.sps for r in results], "rounds": [r.rounds for r in results],
        "steps": [r.steps for r in results], "seconds": [r.seconds for r in results],
        "cpu": [r.cpu for r in results], "extra": [r.extra for r in results], "errors": errors,
        "load_before": load_before, "killed_at_end": killed, "surviving": surviving,
        "startup_s": round(startup_s, 1), "shutdown_s": round(shutdown_s, 1),
    }
    # per second of core time that other programs of the machine left to each process
    record["adj_sps"] = sum(r.samples / max(1e-9, r.seconds - r.cpu.get("core:others", 0.0)) for r in results)
    record["others_share"] = statistics.mean(r.cpu.get("core:others", 0.0) / r.seconds for r in results)
    # over the intervals when other programs left each process's core alone (None if one process had too few)
    quiet = [r.quiet_sps for r in results]
    record["quiet_sps"] = None if None in quiet or errors else sum(quiet)
    record["quiet_share"] = statistics.mean(r.quiet_s / r.seconds for r in results)
    if variant in ("ours", "hivemind"):
        record["valid"] = not errors and all(r.rounds > 0 for r in results)
    else:
        record["valid"] = not errors
    return record


def summarize(runs: dict, args, cfg: Config, wall: float) -> dict:
    """Medians over repeats. ``*_adjusted``: the same with each process's rate taken per second of its core that
    other programs of the machine left to it (``samples / (window - others' CPU on that core)``)."""
    import hivemind
    import numpy as np
    import torch

    out: dict = {}
    alone = [r for r in runs.get("alone", []) if r["valid"]]
    for key in ("sps", "adj_sps", "quiet_sps"):
        by_core: dict[int, list] = {}
        for r in alone:
            by_core.setdefault(r["cores"][0], []).append(r[key])
        by_core = {core: [v for v in values if v is not None] for core, values in by_core.items()}
        out[f"alone_{key}"] = (median([statistics.mean(v) for v in zip(*by_core.values())])
                               if by_core and all(by_core.values()) else None)
        for core, values in sorted(by_core.items()):
            out[f"alone_{key}_core{core}"] = median(values)
    out["alone_others_share"] = median([r["others_share"] for r in alone])
    out["alone_quiet_share"] = median([r["quiet_share"] for r in alone])
    for variant in ("independent", "ours", "hivemind"):
        if variant not in runs:
            continue
        valid = [r for r in runs[variant] if r["valid"]]
        out[f"{variant}_sps"] = median([r["sps"] for r in valid])
        out[f"{variant}_per_peer_sps"] = [median([r["per_peer_sps"][i] for r in valid]) for i in range(2)]
        out[f"{variant}_invalid_runs"] = len(runs[variant]) - len(valid)
        for key, suffix in (("sps", ""), ("adj_sps", "_adjusted"), ("quiet_sps", "_quiet")):
            base = out[f"alone_{key}"]
            effs = [r[key] / (2 * base) for r in valid if r[key] is not None] if base else []
            out[f"{variant}_efficiency{suffix}"] = median(effs)
            out[f"{variant}_efficiencies{suffix}"] = [round(e, 4) for e in effs]
        out[f"{variant}_others_share"] = median([r["others_share"] for r in valid])
        out[f"{variant}_quiet_share"] = median([r["quiet_share"] for r in valid])
        if variant != "independent":
            key = "ours_rounds" if variant == "ours" else "hivemind_epochs"
            out[key] = median([statistics.mean(r["rounds"]) for r in valid])
        out[f"{variant}_cpu_s"] = _median_dicts([_mean_dicts(r["cpu"]) for r in valid])
        out[f"{variant}_extra"] = _median_dicts([_mean_dicts(r["extra"]) for r in valid])
    if out.get("independent_sps") and out.get("ours_sps"):
        out["ours_vs_independent"] = out["ours_sps"] / out["independent_sps"]
    if out.get("hivemind_sps") and out.get("ours_sps"):
        out["ours_vs_hivemind"] = out["ours_sps"] / out["hivemind_sps"]
    if alone:
        out["alone_cpu_s"] = _median_dicts([r["cpu"][0] for r in alone])
        out["alone_extra"] = _median_dicts([r["extra"][0] for r in alone])
    out["processes_surviving"] = sum(r["surviving"] for rs in runs.values() for r in rs)
    out["runs"] = {v: [{k: r[k] for k in ("cores", "sps", "adj_sps", "quiet_sps", "quiet_share", "per_peer_sps", "rounds", "others_share",
                                          "valid", "errors", "load_before", "busy_before")} for r in rs] for v, rs in runs.items()}
    out["config"] = {
        "repeats": args.repeats, "warmup_s": args.warmup, "alone_warmup_s": args.alone_warmup,
        "window_s": args.window, "variants": args.variants, "alone_cores": args.alone_cores,
        "ours": {"period_s": cfg.period_s, "codec": cfg.codec, "timeout_s": cfg.timeout_s, "group": "replicated"},
        "hivemind": {"target_batch_size": cfg.hivemind_target, "batch_size_per_step": 32,
                     "matchmaking_time": cfg.matchmaking_time, "averaging_timeout": cfg.averaging_timeout,
                     "request_timeout": cfg.request_timeout, "use_local_updates": True, "compression": "none"},
        "model": "default demo manifest, all 16 experts local", "params": sum(p.numel() for p in build(0)[2]),
        "batch_size": 16, "samples_per_step": 32, "torch_threads": 1, "hivemind_version": hivemind.__version__,
        "torch": torch.__version__, "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_s": round(wall, 1), "load_average_end": os.getloadavg()[0],
    }
    return out


def print_summary(s: dict) -> None:
    if s.get("alone_sps") is None:
        print("no alone run: no efficiencies", flush=True)
        return
    print(f"alone: {s['alone_sps']:.1f} samples/s " +
          " ".join(f"(core {k[-1]}: {v:.1f})" for k, v in s.items() if k.startswith("alone_sps_core")) +
          f"; other programs used {s['alone_others_share']:.0%} of its core; over quiet intervals "
          f"({s['alone_quiet_share']:.0%} of the window): {_fmt(s['alone_quiet_sps'], '.1f')}", flush=True)
    for variant in ("independent", "ours", "hivemind"):
        if s.get(f"{variant}_efficiency") is None:
            continue
        line = (f"{variant}: {s[f'{variant}_sps']:.1f} samples/s for 2 peers "
                f"({' + '.join(f'{x:.1f}' for x in s[f'{variant}_per_peer_sps'])}) -> efficiency "
                f"{s[f'{variant}_efficiency']:.3f} (runs: {', '.join(f'{e:.3f}' for e in s[f'{variant}_efficiencies'])})"
                f"; other programs used {s[f'{variant}_others_share']:.0%} of the cores; corrected for that: "
                f"{_fmt(s[f'{variant}_efficiency_adjusted'])}; over quiet intervals only "
                f"({s[f'{variant}_quiet_share']:.0%} of the window): {_fmt(s[f'{variant}_efficiency_quiet'])}")
        if variant == "ours":
            line += f"; exchanges per peer in the window {s['ours_rounds']}"
        if variant == "hivemind":
            line += f"; epochs per peer in the window {s['hivemind_epochs']}"
        print(line, flush=True)
    if s.get("ours_vs_hivemind"):
        print(f"ours / hivemind throughput: {s['ours_vs_hivemind']:.2f}x", flush=True)
    for variant in ("alone", "independent", "ours", "hivemind"):
        cpu = s.get(f"{variant}_cpu_s")
        if cpu:
            print(f"{variant} CPU seconds per process in the window: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])), flush=True)
        extra = s.get(f"{variant}_extra")
        if extra:
            print(f"{variant} per process: " + ", ".join(f"{k} {v:g}" for k, v in extra.items()), flush=True)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def wait_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait_s``) until the machine's cores are busy less than ``threshold`` of the time over
    one second; returns the busy fraction last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a = _cpu_totals()
        time.sleep(1.0)
        b = _cpu_totals()
        busy = (b[0] - a[0]) / max(1e-9, b[1] - a[1])
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def _cpu_totals() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with stderr on /dev/null: at exit it would warn about the
    semaphores of the children we SIGKILLed (it still cleans them up) after the JSON line."""
    from multiprocessing import resource_tracker

    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _start_pinned(ctx, core: int, conn):
    """Start a spawned child with this thread's CPU affinity set to ``core`` (the child inherits it)."""
    saved = os.sched_getaffinity(0)
    saved_env = {k: os.environ.get(k) for k in CHILD_ENV}
    os.sched_setaffinity(0, {core})
    os.environ.update(CHILD_ENV)
    try:
        proc = ctx.Process(target=child_main, args=(conn, core))  # not daemonic: it starts p2pd and DHTs
        proc.start()
    finally:
        os.sched_setaffinity(0, saved)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc


def _kill_sessions(sids: list, sockets: list = ()) -> tuple[int, int]:
    """SIGKILL every process of the given sessions (each child made its own): (how many were still there, how many
    survived)."""
    found = 0
    sockets = set(sockets) | set(_p2pd_sockets(sids))
    for _ in range(3):
        members = [pid for pid, sid in _sessions().items() if sid in sids]
        if not members:
            break
        found = max(found, len(members))
        for sid in sids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    remaining = [pid for pid, sid in _sessions().items() if sid in sids]
    if remaining:
        print(f"WARNING: processes {remaining} survived SIGKILL", flush=True)
    for path in sockets:  # a SIGKILLed p2pd leaves its unix sockets behind
        with contextlib.suppress(OSError):
            os.unlink(path)
    return found, len(remaining)


def _p2pd_sockets(sids: list) -> list:
    """The hivemind unix socket files (p2pd's and its clients') that processes of these sessions listen on."""
    inodes = set()
    for pid, sid in _sessions().items():
        if sid not in sids:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    paths = []
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[6] in inodes and "/hivemind-" in parts[7]:
                paths.append(parts[7])
    return paths


def _sessions() -> dict[int, int]:
    """pid -> session id of every live, non-zombie process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest[0] != "Z":
            out[int(entry)] = int(rest[3])
    return out



def _expect(message, kind):
    expect(message, kind)
    if getattr(message, "error", "") and kind is Ready:
        raise RuntimeError(f"child failed to start: {message.error}")
    return message



def _mean_dicts(dicts: list) -> dict:
    keys = {k for d in dicts for k, v in d.items() if isinstance(v, (int, float))}
    return {k: statistics.mean(d.get(k, 0.0) for d in dicts) for k in keys}


def _median_dicts(dicts: list) -> dict:
    keys = {k for d in dicts for k in d}
    return {k: round(median([d.get(k, 0.0) for d in dicts]), 4) for k in sorted(keys)}


def _describe(r: dict) -> str:
    text = f"{r['sps']:.1f} samples/s"
    if len(r["per_peer_sps"]) > 1:
        text += f" ({' + '.join(f'{x:.1f}' for x in r['per_peer_sps'])})"
    if r["variant"] in ("ours", "hivemind"):
        text += f", {'exchanges' if r['variant'] == 'ours' else 'epochs'} per peer {r['rounds']}"
    cpu = _mean_dicts(r["cpu"])
    top = sorted(cpu.items(), key=lambda kv: -kv[1])[:6]
    text += " | cpu s/peer " + ", ".join(f"{k} {v:.1f}" for k, v in top)
    if not r["valid"]:
        text += f" | INVALID {r['errors'][:2]}"
    if r["killed_at_end"]:
        text += f" | SIGKILLed {r['killed_at_end']} processes left at the end"
    if r["surviving"]:
        text += f" | {r['surviving']} SURVIVED"
    text += (f" | others used {r['others_share']:.0%} of the core(s) -> {r['adj_sps']:.1f} per free core-second"
             f"; quiet {r['quiet_share']:.0%} of the window -> {_fmt(r['quiet_sps'], '.1f')}")
    return text + f" | load {r['load_before']:.1f} | start {r['startup_s']} s, stop {r['shutdown_s']} s"


# ---- the processes ----


def child_main(conn, core: int) -> None:
    os.sched_setaffinity(0, {core})  # before torch: its thread pools start on this core only
    os.setsid()  # our own session: the benchmark kills it whole (p2pd, DHT and averager processes included)
    _die_with_parent()
    import logging

    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    setup: Setup = conn.recv()
    logging.basicConfig(format=f"{setup.variant}/{setup.rank} %(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger().setLevel(setup.config.log_level)
    for name in ("swarmtrain", "hivemind"):
        logging.getLogger(name).setLevel(setup.config.log_level)
    try:
        worker = {"ours": OursWorker, "hivemind": HivemindWorker}.get(setup.variant, PlainWorker)(setup)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        conn.send(Ready(setup.rank, [], error=f"{type(e).__name__}: {e}"))
        return
    conn.send(Ready(setup.rank, worker.maddrs))
    while True:
        message = conn.recv()
        if message == "wait_partners":
            worker.wait_partners()
            conn.send(Ready(setup.rank, []))
        elif isinstance(message, Go):
            conn.send(worker.train(message))
        else:  # Stop
            break
    with contextlib.suppress(OSError):  # teardown chatter (hivemind's processes racing its exit) is not a result
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    worker.close()
    os._exit(0)  # skip interpreter teardown (hivemind's atexit hooks); the parent kills whatever is left


def build(rank: int):
    """The demo model with all experts local, its parameters, Adam (the manifest's) and this rank's data shard."""
    from swarmtrain.dht.records import Manifest
    from swarmtrain.expert_pool.dispatch import LocalDispatcher
    from swarmtrain.expert_pool.expert import make_expert
    from swarmtrain.peer.data import DataSource
    from swarmtrain.peer.model import SwarmModel

    manifest = Manifest(run_id=RUN_ID, created_at=0.0, coordinator="Qm" + "1" * 44)  # the coordinator's defaults
    spec = manifest.model
    experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}
    model = SwarmModel(manifest, LocalDispatcher(experts))
    params = list(model.parameters()) + [p for uid in sorted(experts) for p in experts[uid].parameters()]
    data = DataSource.builtin(manifest, manifest.modalities, rank, 2)
    return manifest, model, params, data


class TimedLock:
    """The trainer's lock, also adding up how long the training thread waited for it and how long others held it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = threading.get_ident()
        self.train_wait = 0.0
        self.other_hold = 0.0
        self._local = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        t0 = time.perf_counter()
        ok = self._lock.acquire(blocking, timeout)
        t1 = time.perf_counter()
        if threading.get_ident() == self.owner:
            self.train_wait += t1 - t0
        self._local.since = t1
        return ok

    def release(self) -> None:
        if threading.get_ident() != self.owner:
            self.other_hold += time.perf_counter() - self._local.since
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def locked(self) -> bool:
        return self._lock.locked()


class PlainWorker:
    """alone / independent: a plain torch loop, nothing else."""

    def __init__(self, setup: Setup):
        import torch

        self.setup = setup
        self.maddrs: list = []
        self.known_pids: dict[int, str] = {}  # pid -> label, for the CPU breakdown
        self.samples = self.steps = 0
        self.manifest, self.model, self.params, self.data = build(setup.rank)
        self.optimizer = self.make_optimizer()
        self.batch_size = self.manifest.training.batch_size
        self.generator = torch.Generator().manual_seed(setup.rank)

    def make_optimizer(self):
        from swarmtrain.peer.trainer import build_optimizer

        return build_optimizer(self.params, self.manifest.optimizer)

    def step(self) -> None:
        batch = self.data.sample(self.batch_size, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model.losses(batch)
        self.model.total_loss(losses).backward()
        self.optimizer.step()
        self.steps += 1
        self.samples += batch.num_samples()

    def rounds(self) -> int:
        return 0

    def extra(self) -> dict:
        return {}

    def wait_partners(self) -> None:
        pass

    def train(self, go: Go) -> Result:
        result = Result(self.setup.rank, self.setup.core)
        try:
            while time.monotonic() < go.window_start:
                self.step()
            t0, s0, n0, r0 = time.monotonic(), self.samples, self.steps, self.rounds()
            cpu0, x0 = cpu_snapshot(self.known_pids), self.extra()
            probes = [(t0, s0, _others(cpu0))]  # (time, samples, others' CPU on this core so far) every PROBE_S
            while (now := time.monotonic()) < go.window_end:
                if now >= probes[-1][0] + PROBE_S:
                    probes.append((now, self.samples, _others(cpu_snapshot(self.known_pids))))
                self.step()
            t1, s1, n1, r1 = time.monotonic(), self.samples, self.steps, self.rounds()
            cpu1, x1 = cpu_snapshot(self.known_pids), self.extra()
            probes.append((t1, s1, _others(cpu1)))
            result.seconds, result.samples, result.steps, result.rounds = t1 - t0, s1 - s0, n1 - n0, r1 - r0
            result.sps = result.samples / result.seconds
            result.cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 3) for k in cpu1}
            result.cpu = {k: v for k, v in result.cpu.items() if v > 0 or k == "train_thread"}
            # CPU on this core not used by our session (other programs of the machine; approximate: jiffies)
            result.cpu["core:others"] = round(max(0.0, _others(cpu1) - _others(cpu0)), 3)
            result.cpu["wall"] = round(result.seconds, 3)
            quiet = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(probes, probes[1:])
                     if b[2] - a[2] <= QUIET_SHARE * (b[0] - a[0])]
            quiet_s = sum(dt for dt, _ in quiet)
            result.quiet_s = quiet_s
            result.quiet_sps = sum(n for _, n in quiet) / quiet_s if quiet_s >= MIN_QUIET_S else None
            result.extra = {k: x1[k] - x0.get(k, 0) for k in x1}
            result.extra["train_cpu_ms_per_step"] = 1000 * result.cpu["train_thread"] / max(1, result.steps)
            result.extra["wall_ms_per_step"] = 1000 * result.seconds / max(1, result.steps)
            result.extra["unpinned_processes"] = _unpinned(self.setup.core)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            import traceback

            traceback.print_exc()
            result.error = f"{type(e).__name__}: {e}"
        return result

    def close(self) -> None:
        pass


class OursWorker(PlainWorker):
    """ours: SwarmNode + GossipAverager over all parameters + the peer's Trainer."""

    def __init__(self, setup: Setup):
        from swarmtrain.averaging.gossip import GossipAverager
        from swarmtrain.dht.directory import SwarmDirectory
        from swarmtrain.dht.identity import Identity
        from swarmtrain.dht.node import SwarmNode
        from swarmtrain.dht.records import AveragingSpec
        from swarmtrain.peer.trainer import Trainer

        super().__init__(setup)
        cfg = setup.config
        self.identity = Identity.load_or_create(None)
        self.node = SwarmNode(RUN_ID, self.identity, initial_peers=setup.initial_peers, host_maddrs=LOCAL)
        self.directory = SwarmDirectory(self.node.dht, RUN_ID, self.node.peer_id)
        self.lock = TimedLock()
        spec = AveragingSpec(period_s=cfg.period_s, timeout_s=cfg.timeout_s, codec=cfg.codec)
        self.averager = GossipAverager(self.node, self.directory, [p.data for p in self.params], self.lock, spec,
                                       group="replicated", seed=setup.rank)
        self.averager.start()
        self.trainer = Trainer(self.model, self.data, self.optimizer, self.lock, self.averager, self.batch_size, setup.rank, _cpu())
        self.maddrs = self.node.visible_maddrs()
        self.known_pids = {self.node.dht.pid: "dht_process"}

    def wait_partners(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self.node.loop.run(self.averager.rendezvous.partners(self.averager.group, fresh=True))
            if len(found) >= 1:
                return
            time.sleep(0.1)
        raise RuntimeError("the partner never appeared in the rendezvous record")

    def step(self) -> None:
        before = self.trainer.stats.samples
        self.trainer.step()
        self.steps += 1
        self.samples += self.trainer.stats.samples - before

    def rounds(self) -> int:
        return self.averager.stats().rounds

    def extra(self) -> dict:
        s = self.averager.stats()
        return {"initiated": s.rounds - s.served, "served": s.served, "failures": s.failures, "busy": s.busy,
                "rejected": s.rejected, "stale_dropped": s.stale_dropped,
                "MB_sent": s.bytes_sent / 1e6, "MB_received": s.bytes_received / 1e6,
                "lock_wait_s": self.lock.train_wait, "lock_held_by_averager_s": self.lock.other_hold}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.averager.shutdown()
        with contextlib.suppress(Exception):
            self.node.shutdown()
        with contextlib.suppress(FileNotFoundError):  # a throwaway identity may be cleaned up with its node
            os.unlink(self.identity.path)


class HivemindWorker(PlainWorker):
    """hivemind: hivemind.DHT + hivemind.Optimizer(use_local_updates=True) around the same Adam."""

    def __init__(self, setup: Setup):
        import multiprocessing

        multiprocessing.set_start_method("fork", force=True)  # hivemind's averager processes are forked
        import hivemind

        self._hivemind = hivemind
        super().__init__(setup)

    def make_optimizer(self):
        import torch

        hivemind, cfg, spec = self._hivemind, self.setup.config, self.manifest.optimizer
        if spec.name != "adam":
            raise ValueError(f"the hivemind variant mirrors the manifest's Adam, not {spec.name!r}")
        self.dht = hivemind.DHT(initial_peers=self.setup.initial_peers, host_maddrs=LOCAL, start=True)
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        opt = hivemind.Optimizer(
            dht=self.dht, run_id=f"{RUN_ID}{self.setup.run_index}", params=self.params,
            optimizer=lambda groups: torch.optim.Adam(  # the same as build_optimizer's (fused, one kernel)
                groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True),
            target_batch_size=cfg.hivemind_target, batch_size_per_step=32, use_local_updates=True,
            matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout, verbose=False,
            averager_opts={"request_timeout": cfg.request_timeout},  # hivemind: keep it under matchmaking_time
        )
        self.known_pids = {self.dht.pid: "dht_process", opt.state_averager.pid: "averager_process"}
        return opt

    def step(self) -> None:
        batch = self.data.sample(self.batch_size, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model.losses(batch)
        self.model.total_loss(losses).backward()
        self.optimizer.step()  # batch_size_per_step = 32 = batch.num_samples()
        self.steps += 1
        self.samples += batch.num_samples()

    def rounds(self) -> int:
        return self.optimizer.local_epoch

    def extra(self) -> dict:
        return {"global_epoch": self.optimizer.tracker.global_epoch}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.optimizer.shutdown()
        with contextlib.suppress(Exception):
            self.dht.shutdown()


def cpu_snapshot(known_pids: dict) -> dict:
    """CPU seconds so far of this process's threads (by Python thread name) and of the processes of its session."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    main_tid = threading.main_thread().native_id
    out: dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        out[key] = out.get(key, 0.0) + seconds

    for tid in os.listdir("/proc/self/task"):
        stat = _stat(f"/proc/self/task/{tid}/stat")
        if stat is None:
            continue
        seconds = (int(stat[11]) + int(stat[12])) / tick
        if int(tid) == main_tid:
            continue  # measured more precisely below
        add(f"thread:{_thread_label(names.get(int(tid)), stat)}", seconds)
    add("train_thread", time.thread_time() if threading.get_ident() == threading.main_thread().ident else 0.0)
    own, sid = os.getpid(), os.getsid(0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        stat = _stat(f"/proc/{entry}/stat")
        if stat is None or int(stat[3]) != sid:
            continue
        label = known_pids.get(int(entry)) or _comm(entry)
        add(f"proc:{label}", (int(stat[11]) + int(stat[12])) / tick)  # utime + stime (own, not children's)
    core = sorted(os.sched_getaffinity(0))[0]
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) / tick for v in line.split()[1:9])
                out["core:busy"] = user + nice + system + irq + softirq
                out["core:idle"] = idle + iowait
                out["core:steal"] = steal
    return out


def _unpinned(core: int) -> int:
    """How many processes of this session (p2pd, DHT, averager processes) may run on other cores than ``core``."""
    sid, count = os.getsid(0), 0
    for entry in os.listdir("/proc"):
        stat = _stat(f"/proc/{entry}/stat") if entry.isdigit() else None
        if stat is not None and int(stat[3]) == sid:
            with contextlib.suppress(OSError):
                count += os.sched_getaffinity(int(entry)) != {core}
    return count


def _others(snapshot: dict) -> float:
    """CPU seconds other programs spent on this core so far: the core's busy time minus this session's."""
    own = sum(v for k, v in snapshot.items() if not k.startswith("core:"))
    return snapshot.get("core:busy", 0.0) - own


def _thread_label(name: Optional[str], stat) -> str:
    if not name:
        return "unnamed"
    for prefix in ("avg-", "ThreadPoolExecutor-", "Thread-"):
        if name.startswith(prefix):
            return name.rsplit("_", 1)[0] if prefix == "avg-" else prefix.rstrip("-")
    return name.split(" (")[0]


def _stat(path: str):
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _cpu():
    import torch

    return torch.device("cpu")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the benchmark dies (its session is still killed on a clean exit)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    main()
