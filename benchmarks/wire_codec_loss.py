"""Does the expert wire codec cost loss? The demo model trained at equal samples with every expert call's four
tensors (x and the output forward, grad_out and grad_x backward) passed through the wire codec's real encode and
decode (``expert_pool.codec``), for each codec and seed; medians of the final validation loss.

What it is for: the claim behind ``expert_pool.wire_codec = "auto"`` (blockwise 8-bit on slow links) that 8-bit
activations and gradients train as well as float32 on the demo task. What it is not: a transport benchmark (the
experts run in this process; the bytes and the timing of the wire are measured by ``benchmarks/home_links.py`` and
``benchmarks/expert_pool.py``). One process, one thread, deterministic per seed.

Run: ``.venv/bin/python benchmarks/wire_codec_loss.py [--steps 400] [--seeds 0 1 2]``; the LAST line is JSON:
``{"val": {"none": f, "fp16": f, "blockwise8": f}, "blockwise8_vs_none": f, ...}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from swarmtrain.dht.records import Manifest
from swarmtrain.dht.uids import make_uid
from swarmtrain.expert_pool.codec import CODECS, decode_tensor, encode_tensor
from swarmtrain.expert_pool.dispatch import LocalDispatcher
from swarmtrain.expert_pool.expert import make_expert
from swarmtrain.peer.data import DataSource
from swarmtrain.peer.model import SwarmModel
from swarmtrain.peer.trainer import Trainer, build_optimizer


class _Wire(torch.autograd.Function):
    """Identity up to the codec's round trip, forward and backward (what crossing the wire does to a tensor)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, codec: str) -> torch.Tensor:
        ctx.codec = codec
        return decode_tensor(encode_tensor(tensor, codec))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return decode_tensor(encode_tensor(grad.contiguous(), ctx.codec)), None


class WireDispatcher(LocalDispatcher):
    """In-process experts whose inputs, outputs and both gradients go through the wire codec."""

    def __init__(self, experts: dict, codec: str):
        super().__init__({uid: (lambda x, e=expert: _Wire.apply(e(_Wire.apply(x, codec)), codec))
                          for uid, expert in experts.items()})
        self.modules = experts

    def parameters(self):
        return [p for expert in self.modules.values() for p in expert.parameters()]


def train(codec: str, seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    manifest = Manifest(run_id="wire-codec", created_at=0.0, coordinator="Qm" + "1" * 44, seed=seed)
    spec = manifest.model
    experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}
    dispatcher = WireDispatcher(experts, codec)
    model = SwarmModel(manifest, dispatcher)
    data = DataSource.builtin(manifest, manifest.modalities, shard_index=0, shard_count=1)
    params = list(model.parameters()) + dispatcher.parameters()
    trainer = Trainer(model, data, build_optimizer(params, manifest.optimizer), threading.Lock(), None,
                      manifest.training.batch_size, seed, torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    return {"val": trainer.evaluate(), "skipped": trainer.stats.skipped_steps, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {codec: [] for codec in args.codecs}
    for seed in args.seeds:
        for codec in args.codecs:
            result = train(codec, seed, args.steps)
            runs[codec].append(result)
            print(f"seed {seed} {codec:>10}: val {result['val']:.4f} ({result['seconds']:.0f} s, "
                  f"{result['skipped']} skipped steps)", flush=True)
    val = {codec: statistics.median(r["val"] for r in results) for codec, results in runs.items()}
    summary = {"val": val, "steps": args.steps, "seeds": args.seeds, "samples_per_step": 32, "runs": runs}
    if "none" in val:
        for codec in val:
            if codec != "none":
                summary[f"{codec}_vs_none"] = val[codec] / val["none"] - 1
                print(f"{codec}: median val {val[codec]:.4f} vs none {val['none']:.4f} "
                      f"({100 * summary[f'{codec}_vs_none']:+.2f}%)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
