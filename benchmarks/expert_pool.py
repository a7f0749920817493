#!/usr/bin/env python
"""Expert pool benchmark: our RemoteDispatcher vs. hivemind 1.1.12 RemoteMixtureOfExperts vs. local dense k=2.

All in ONE run on 127.0.0.1, same experts everywhere: ``n_experts`` ExpertFFN (``Linear(h, f) -> gelu ->
Linear(f, h)``, default h=512, f=2048), top-k=2, one fwd+bwd per call, for each batch size:

* ``hivemind``: a ``hivemind.moe`` Server (``background_server``, ``num_handlers`` handler processes, our ExpertFFN
  registered as a hivemind expert class, optimizer as in the anchor run: none) called through
  ``RemoteMixtureOfExperts(grid_size=(2, n/2), k_best=2)`` from a client-mode DHT (how
  /work/shared/anchors/bench_moe.py ran the baseline);
* ``ours``: ``python -m swarmtrain.expert_pool.host`` with the same experts (``--handler-threads``, one torch thread
  each; its backward also applies the manifest's optimizer step, adam by default, which the hivemind server skips)
  called through :class:`~swarmtrain.expert_pool.client.RemoteDispatcher` with random top-2 routing, once per
  wire codec in ``--codecs`` (the first one is the headline);
* ``local``: the dense k=2 baseline of the anchor: two local FFNs fwd+bwd over the whole batch in this process.
* ``local_train`` (for information, not the headline): ``local`` plus one fused Adam step of the two FFNs, i.e.
  the same kind of work our server does per call (it steps every expert it ran); ``ratio_vs_local_train``
  compares against it.

Methods are timed round-robin within each repeat (so machine load drifts hit all of them alike); each figure is
the median over ``--repeats`` repeats of the mean time per call. The LAST line printed is one JSON object:
``{"batch": {"128": {"ours_s", "hivemind_s", "local_s", "speedup_vs_hivemind", "ratio_vs_local", ...}, ...}, ...}``.

Run: ``.venv/bin/python benchmarks/expert_pool.py [--batch-sizes 16 128] [--repeats 3] [--codecs none fp16 blockwise8]``
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. With the default (active) policy,
# the client's 2 OpenMP threads spin after every small op and take the cores the server process needs; on a
# loaded 2-core box we measured the local dense baseline alone at 402 ms (active) vs 32 ms (passive) per call.
# It applies to all three methods alike (the hivemind server is forked from this process).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from swarmtrain.expert_pool.expert import ExpertFFN  # noqa: E402

HIVEMIND_EXPERT = "swarmtrain_ffn"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--handlers", type=int, default=2, help="server handler threads (ours) / processes (hivemind)")
    parser.add_argument("--codecs", nargs="+", default=["none", "fp16", "blockwise8"])
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "adam8bit"],
                        help="our server's expert optimizer (one step per backward batch)")
    parser.add_argument("--skip-hivemind", action="store_true")
    parser.add_argument("--activation-cache-mb", type=float, default=256,
                        help="our server keeps forward activations for the backward (0: recompute the forward, as "
                             "hivemind does, and resend x)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = {**vars(args), "torch_threads_client": torch.get_num_threads()}
    config["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    results: dict = {"config": config, "batch": {}}
    with contextlib.ExitStack() as stack:
        # hivemind's background_server forks this process: start it before any thread or torch compute exists here
        hm_info = None if args.skip_hivemind else stack.enter_context(_hivemind_server(args))
        ours = stack.enter_context(_our_swarm(args))
        hm_moe = None if args.skip_hivemind else stack.enter_context(_hivemind_moe(args, hm_info))
        local = [ExpertFFN(args.hidden, args.ffn) for _ in range(2)]
        local_optimizer = torch.optim.Adam([p for f in local for p in f.parameters()], lr=1e-4, fused=True)

        for batch in args.batch_sizes:
            x = torch.randn(batch, args.hidden, requires_grad=True)
            g = torch.randn(batch, args.hidden)
            methods = {"local": (lambda: _local_dense_k2(local, x, g), max(20, 2560 // batch)),
                       "local_train": (lambda: _local_train_step(local, local_optimizer, x, g), max(20, 2560 // batch))}
            for codec in args.codecs:
                dispatcher = ours["dispatchers"][codec]
                methods[f"ours_{codec}"] = (lambda d=dispatcher: _ours(d, x, g, args.experts), max(8, 1280 // batch))
            if hm_moe is not None:
                methods["hivemind"] = (lambda: _hivemind(hm_moe, x, g), max(3, 320 // batch))
            times = {name: [] for name in methods}
            for name, (fn, calls) in methods.items():  # warm-up: connections, allocator, optimizer state
                for _ in range(2):
                    fn()
            for _ in range(args.repeats):
                for name, (fn, calls) in methods.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times[name].append((time.perf_counter() - start) / calls)
            row = {name: {"median_s": statistics.median(t), "all_s": t} for name, t in times.items()}
            headline = f"ours_{args.codecs[0]}"
            summary = {"ours_s": row[headline]["median_s"], "local_s": row["local"]["median_s"]}
            summary["ratio_vs_local"] = summary["ours_s"] / summary["local_s"]
            summary["local_train_s"] = row["local_train"]["median_s"]
            summary["ratio_vs_local_train"] = summary["ours_s"] / summary["local_train_s"]
            if "hivemind" in row:
                summary["hivemind_s"] = row["hivemind"]["median_s"]
                summary["speedup_vs_hivemind"] = summary["hivemind_s"] / summary["ours_s"]
                summary["hivemind_ratio_vs_local"] = summary["hivemind_s"] / summary["local_s"]
            for codec in args.codecs:
                summary[f"ours_{codec}_s"] = row[f"ours_{codec}"]["median_s"]
            summary["methods"] = row
            results["batch"][str(batch)] = summary
            ratios = ", ".join(
                f"{k}={v:.4g}" for k, v in summary.items() if k != "methods" and isinstance(v, float)
            )
            print(f"batch {batch}: {ratios}", flush=True)
        results["ours_wire"] = {}
        for codec, dispatcher in ours["dispatchers"].items():
            stats = dispatcher.stats
            calls = max(stats.forward_calls, 1)
            results["ours_wire"][codec] = {
                "forward_failures": stats.forward_failures, "backward_failures": stats.backward_failures,
                "payload_bytes_per_expert_call": (stats.bytes_sent + stats.bytes_received) / (2 * calls),
            }
        print("wire:", json.dumps(results["ours_wire"]), flush=True)
    print(json.dumps(results), flush=True)
    sys.stderr.flush()
    # everything is shut down; skip interpreter teardown, where hivemind objects' __del__ print tracebacks
    # ("no current event loop") after our JSON, which must be the last line
    os._exit(0)


def _local_dense_k2(local: list[ExpertFFN], x: torch.Tensor, g: torch.Tensor) -> None:
    x.grad = None
    (local[0](x) + local[1](x)).backward(g)


def _local_train_step(local: list[ExpertFFN], optimizer: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor):
    for f in local:
        for p in f.parameters():
            p.grad = None
    _local_dense_k2(local, x, g)
    optimizer.step()


def _ours(dispatcher, x: torch.Tensor, g: torch.Tensor, n_experts: int) -> None:
    x.grad = None
    idx = torch.rand(x.shape[0], n_experts).topk(2, dim=1).indices
    out, answered = dispatcher.dispatch(x, idx, "text", 0)
    if not answered.all():
        raise RuntimeError(f"{int((~answered).sum())} (row, expert) pairs not answered: {dispatcher.stats.last_error}")
    (out.sum(dim=1) * g).sum().backward()


def _hivemind(moe, x: torch.Tensor, g: torch.Tensor) -> None:
    x.grad = None
    moe(x).backward(g)


@contextlib.contextmanager
def _hivemind_server(args):
    from hivemind.moe import background_server
    from hivemind.moe.server.layers import register_expert_class

    hidden, ffn = args.hidden, args.ffn

    @register_expert_class(HIVEMIND_EXPERT, lambda batch, dim: torch.empty(batch, dim))
    class HivemindExpertFFN(ExpertFFN):  # the very same module, built from hivemind's (hidden_dim) signature
        def __init__(self, hidden_dim: int):
            super().__init__(hidden_dim, ffn)

    grid = (2, args.experts // 2)
    uids = [f"ffn.{i}.{j}" for i in range(grid[0]) for j in range(grid[1])]
    with background_server(
        expert_uids=uids, expert_cls=HIVEMIND_EXPERT, hidden_dim=hidden, num_handlers=args.handlers,
        device="cpu", optim_cls=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    ) as info:
        failure = None
        try:
            yield info
        except BaseException as e:  # leave background_server's block normally: it then shuts its processes down
            failure = e
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _hivemind_moe(args, info):
    import hivemind
    from hivemind.moe import RemoteMixtureOfExperts

    dht = hivemind.DHT(initial_peers=[str(a) for a in info.addrs], client_mode=True, start=True)
    try:
        moe = RemoteMixtureOfExperts(
            in_features=args.hidden, grid_size=(2, args.experts // 2), dht=dht, uid_prefix="ffn.", k_best=2
        )
        yield moe
    finally:
        dht.shutdown()


@contextlib.contextmanager
def _our_swarm(args):
    from swarmtrain.dht.directory import SwarmDirectory
    from swarmtrain.dht.identity import Identity
    from swarmtrain.dht.node import SwarmNode
    from swarmtrain.dht.records import ExpertPoolSpec, Manifest, ModelSpec, OptimizerSpec
    from swarmtrain.expert_pool.client import RemoteDispatcher
    from swarmtrain.expert_pool.registry import ExpertRegistry

    identity = Identity.load_or_create(None)
    manifest = Manifest(
        run_id="bench-expert-pool", created_at=time.time(), coordinator=identity.peer_id, modalities=("text",),
        experts_per_layer={"text": args.experts}, model=ModelSpec(hidden=args.hidden, layers=1, expert_ffn=args.ffn),
        optimizer=OptimizerSpec(name=args.optimizer, lr=1e-4), expert_pool=ExpertPoolSpec(timeout_s=60),
    )
    workdir = tempfile.mkdtemp(prefix="bench-expert-pool-")
    manifest_path = os.path.join(workdir, "manifest.json")
    with open(manifest_path, "w") as f:
        f.write(manifest.model_dump_json())
    host = subprocess.Popen(
        [sys.executable, "-m", "swarmtrain.expert_pool.host", "--manifest", manifest_path,
         "--experts", *manifest.expert_uids(), "--handler-threads", str(args.handlers), "--torch-threads", "1",
         "--activation-cache-mb", str(args.activation_cache_mb)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    node = None
    stack = contextlib.ExitStack()
    try:
        line = host.stdout.readline()
        if not line:
            raise RuntimeError("the expert host process exited before it was ready")
        ready = json.loads(line)
        node = SwarmNode(manifest.run_id, identity, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         initial_peers=ready["maddrs"], trusted_coordinator=identity.peer_id)
        registry = ExpertRegistry(SwarmDirectory(node.dht, manifest.run_id, node.peer_id), None, ttl_s=60)
        registry.refresh()
        registry.start()  # keep the view fresh: the host republishes its record every 2 s with a 30 s TTL
        stack.callback(registry.stop)
        missing = [uid for uid in manifest.expert_uids() if not registry.hosts(uid)]
        if missing:
            raise RuntimeError(f"experts not found in the registry: {missing}")
        dispatchers = {
            codec: RemoteDispatcher(node.p2p, node.loop, registry, manifest, codec=codec) for codec in args.codecs
        }
        stack.callback(lambda: [d.close() for d in dispatchers.values()])
        yield {"manifest": manifest, "dispatchers": dispatchers}
    finally:
        stack.close()
        if node is not None:
            node.shutdown()
        host.stdin.close()  # the host stops when its stdin closes
        try:
            host.wait(timeout=30)
        except subprocess.TimeoutExpired:
            host.terminate()
            host.wait(timeout=10)
        os.remove(manifest_path)
        os.rmdir(workdir)


if __name__ == "__main__":
    main()
