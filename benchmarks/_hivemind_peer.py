#!/usr/bin/env python
"""One hivemind data-parallel peer as a standalone process, for benchmarks that place each peer on its own host.

For ``benchmarks/home_links.py``, which starts one per network-namespace host (capped links, no loopback between
hosts). The peer trains the demo model as ``efficiency.py``'s ``PlainWorker`` builds it (default manifest, every
expert local, built-in data shard ``seed % shards``, 16 samples per modality a step) with Adam inside
``hivemind.Optimizer`` in its normal data-parallel mode (``use_local_updates=False``: gradients all-reduced every
``target_batch_size`` swarm samples, optimizer state averaged each epoch), both compressed with ``--compression``.

* ``--maddrs-file``: the DHT's multiaddrs, one a line, written atomically once it is up, for the next peers'
  ``--initial-peers`` (or ``--initial-peers-file``, which waits for the file, so that all peers start together).
* ``--log-json``: a line a second, ``{"t", "samples", "steps", "epoch", "global_epoch", "loss", "averaged",
  "local_only"}`` (epochs whose gradients were all-reduced with others / that fell back to local gradients), then
  ``{"final": true, "val_loss", "interrupted", "samples_per_s", ...}``, val_loss as ``Trainer.evaluate`` computes it.

An epoch costs at least ``--matchmaking-time`` plus an all-reduce: make ``--target-batch-size`` many seconds of the
swarm's samples. SIGTERM ends training early; the process exits 0 after shutting hivemind down (1 if training
raised). Not for: swarmtrain's own averaging (``efficiency.py``); it starts no other peers and shapes no traffic.

Run: ``.venv/bin/python benchmarks/_hivemind_peer.py --host-ip 10.213.90.2 [--initial-peers MADDR ...]
--maddrs-file F --duration 60 --target-batch-size 4096 --compression blockwise8 --log-json F2 [--seed 1]``
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback

import numpy as np

CODECS = ("none", "fp16", "blockwise8", "uniform8")
SHUTDOWN_LIMIT_S = 30.0  # hivemind's shutdown can hang on a dead link: exit anyway after this long


def main() -> None:
    args = parse_args()
    multiprocessing.set_start_method("fork", force=True)  # hivemind forks its averager processes
    import torch

    torch.set_num_threads(1)
    stop = threading.Event()
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM, lambda *_: stop.set() if os.getpid() == main_pid else _die_by_sigterm())
    codec = make_codec(args.compression)
    manifest, model, params, data = build(args.seed, args.shards)
    dht, opt, rounds = start_hivemind(args, manifest.optimizer, params, codec)
    code = 0
    try:
        train(args, manifest.training.batch_size, model, data, opt, rounds, stop)
    except Exception:  # noqa: BLE001 - printed; the peer still shuts hivemind down, then exits 1
        traceback.print_exc()
        code = 1
    threading.Timer(SHUTDOWN_LIMIT_S, _exit_now, (3,)).start()
    opt.shutdown()
    dht.shutdown()
    _exit_now(code)


def start_hivemind(args: argparse.Namespace, spec, params, codec):
    """The DHT (its maddrs written to ``--maddrs-file``), then hivemind.Optimizer around the manifest's Adam."""
    import hivemind
    import torch
    from hivemind.optim.grad_averager import GradientAverager

    initial_peers = args.initial_peers or (_wait_for_lines(args.initial_peers_file) if args.initial_peers_file else [])
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[f"/ip4/{args.host_ip}/tcp/0"], start=True)
    write_atomically(args.maddrs_file, "".join(f"{m}\n" for m in dht.get_visible_maddrs()))
    rounds = RoundCounter()
    request_timeout = min(1.0, args.matchmaking_time / 2)  # hivemind: keep it under matchmaking_time
    opt = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, params=params, target_batch_size=args.target_batch_size,
        optimizer=lambda groups: torch.optim.Adam(groups, lr=spec.lr, betas=spec.betas,
                                                  weight_decay=spec.weight_decay, fused=True),
        use_local_updates=False, matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
        grad_compression=codec, state_averaging_compression=codec, load_state_compression=codec, verbose=False,
        averager_opts={"request_timeout": request_timeout},  # reaches the state averager only, hence:
        grad_averager_factory=functools.partial(GradientAverager, request_timeout=request_timeout),
    )
    return dht, opt, rounds


def train(args: argparse.Namespace, batch_size: int, model, data, opt, rounds, stop: threading.Event) -> None:
    """Steps until ``--duration`` is over or SIGTERM; a JSON line each second, the final one with val_loss."""
    import torch
    from swarmtrain.peer.trainer import Trainer

    generator = torch.Generator().manual_seed(args.seed)
    samples = steps = 0
    loss = float("nan")
    started = time.time()
    next_log = started + 1.0
    with open(args.log_json, "a") as log:
        def emit(**record) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        def progress() -> dict:
            return {"t": time.time(), "samples": samples, "steps": steps, "epoch": opt.local_epoch,
                    "global_epoch": opt.tracker.global_epoch, "loss": loss, **rounds.counts()}

        while not stop.is_set() and time.time() < started + args.duration:
            batch = data.sample(batch_size, generator)
            opt.zero_grad(set_to_none=True)
            total = model.total_loss(model.losses(batch))
            total.backward()
            opt.step(batch_size=batch.num_samples())
            samples, steps, loss = samples + batch.num_samples(), steps + 1, float(total.detach())
            if time.time() >= next_log:
                emit(**progress())
                next_log = max(next_log + 1.0, time.time())
        seconds = time.time() - started
        trainer = Trainer(model, data, opt, threading.Lock(), None, batch_size, args.seed, torch.device("cpu"))
        emit(**progress(), final=True, val_loss=trainer.evaluate(), interrupted=stop.is_set(), seconds=seconds,
             samples_per_s=samples / seconds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host-ip", required=True, help="the address the DHT listens on (its host's, not 0.0.0.0)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of a running peer")
    parser.add_argument("--initial-peers-file", help="or: wait for this --maddrs-file of another peer, then read it")
    parser.add_argument("--maddrs-file", required=True)
    parser.add_argument("--log-json", required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds of training")
    parser.add_argument("--target-batch-size", type=int, required=True, help="swarm samples per epoch")
    parser.add_argument("--compression", choices=CODECS, default="none")
    parser.add_argument("--seed", type=int, default=0, help="batch sampling seed; data shard seed %% --shards")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--averaging-timeout", type=float, default=30.0)
    parser.add_argument("--run-id", default="homelinks")
    return parser.parse_args()


def build(seed: int, shards: int):
    """The demo model with all experts local, its parameters and shard ``seed % shards`` of the built-in data."""
    from swarmtrain.dht.records import Manifest
    from swarmtrain.expert_pool.dispatch import LocalDispatcher
    from swarmtrain.expert_pool.expert import make_expert
    from swarmtrain.peer.data import DataSource
    from swarmtrain.peer.model import SwarmModel

    manifest = Manifest(run_id="homelinks", created_at=0.0, coordinator="Qm" + "1" * 44)  # coordinator's defaults
    spec = manifest.model
    experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}
    model = SwarmModel(manifest, LocalDispatcher(experts))
    params = list(model.parameters()) + [p for uid in sorted(experts) for p in experts[uid].parameters()]
    data = DataSource.builtin(manifest, manifest.modalities, seed % shards, shards)
    return manifest, model, params, data


def make_codec(name: str):
    """hivemind's codec ``name``, after checking that it round-trips here (exits with the reason if not)."""
    import torch
    from hivemind.compression import (BlockwiseQuantization, Float16Compression, NoCompression,
                                      Uniform8BitQuantization, deserialize_torch_tensor, serialize_torch_tensor)

    patched = _patch_numpy24()
    codec = {"none": NoCompression, "fp16": Float16Compression, "blockwise8": BlockwiseQuantization,
             "uniform8": Uniform8BitQuantization}[name]()
    tensor = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    try:
        restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, codec.compression_type))
        error = float((restored - tensor).norm() / tensor.norm())
    except Exception as e:  # noqa: BLE001 - any failure here means hivemind would average nothing
        raise SystemExit(f"hivemind codec {name} fails to round-trip ({type(e).__name__}: {e}); "
                         f"NumPy {np.__version__}, NumPy-2.4 patch applied: {patched}")
    if not error < 0.05:
        raise SystemExit(f"hivemind codec {name} round-trips with relative error {error:.3f} (>= 5%)")
    return codec


class _NumpyShim:
    """``numpy`` for hivemind's quantization module: its 1-element int64 header reads come back 0-d."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def frombuffer(*args, **kwargs):
        array = np.frombuffer(*args, **kwargs)
        return array.reshape(()) if kwargs.get("count") == 1 and kwargs.get("dtype") == np.int64 else array


def _patch_numpy24() -> bool:
    """hivemind 1.1.12's 8-bit codecs read headers with ``int(1-element array)``, a TypeError on NumPy >= 2.4
    (caught in the averager, which then reports success having averaged nothing): patch its quantization module,
    before the averagers fork so that they inherit it. True if the patch is needed."""
    import hivemind.compression.quantization as quantization

    try:
        int(np.zeros(1, dtype=np.int64))
        return False
    except TypeError:
        quantization.np = _NumpyShim()
        return True


class RoundCounter(logging.Filter):
    """Counts hivemind.Optimizer's epoch outcomes from its status log (at DEBUG unless verbose), dropping them.

    ``averaged`` counts the rounds hivemind calls done: one whose codec failed inside the averager still counts
    (each peer then keeps its own part, logged only as "received 50% ..."), hence ``make_codec``'s check."""

    def __init__(self):
        super().__init__()
        self.averaged = self.local_only = 0
        logger = logging.getLogger("hivemind.optim.optimizer")
        logger.setLevel(logging.DEBUG)
        logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Averaged gradients with"):  # "... with {n} peers", n counting this one
            self.averaged += int(message.split()[3]) > 1
        self.local_only += message.startswith("Proceeding with local gradients")
        return record.levelno >= logging.WARNING

    def counts(self) -> dict:
        return {"averaged": self.averaged, "local_only": self.local_only}


def _wait_for_lines(path: str, timeout: float = 300.0) -> list:
    """The lines of ``path`` once it exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)
    with open(path) as f:
        return f.read().split()


def _die_by_sigterm() -> None:
    """In hivemind's forked processes: SIGTERM does what it would have done without our handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_now(code: int) -> None:
    """Kill what this process started (hivemind's DHT and averager processes, p2pd), then exit at once."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(code)


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
