"""Tests of the expert pool: codecs, batching, server, registry and RemoteDispatcher on real hivemind DHT + p2pd.

In-process tests share one server node and one client node (each a real DHT process + p2pd on 127.0.0.1); the
fault test runs the server as a separate process (``python -m swarmtrain.expert_pool.host``) and kills its whole
process group mid-training.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import ExpertPoolSpec, Manifest, ModelSpec, OptimizerSpec
from swarmtrain.expert_pool.activations import ActivationCache
from swarmtrain.expert_pool.batching import BatchQueue
from swarmtrain.expert_pool.client import (
    ExpertCallError,
    HostBans,
    RemoteDispatcher,
    _call,
    call_expert,
    fetch_expert_state,
)
from swarmtrain.expert_pool.codec import WireError, decode_tensor, encode_tensor
from swarmtrain.expert_pool.dispatch import LocalDispatcher
from swarmtrain.expert_pool.expert import make_expert
from swarmtrain.expert_pool.registry import ExpertRegistry, choose_experts_to_host
from swarmtrain.expert_pool.server import ExpertServer
from swarmtrain.expert_pool.session import HostSession, SessionError
from swarmtrain.expert_pool.wire import pack_request

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
HIDDEN, FFN, E = 32, 64, 4


def make_manifest(coordinator: str, run_id: str = "pooltest", **pool) -> Manifest:
    return Manifest(
        run_id=run_id,
        created_at=time.time(),
        coordinator=coordinator,
        seed=7,
        modalities=("text",),
        experts_per_layer={"text": E},
        model=ModelSpec(hidden=HIDDEN, heads=4, layers=2, expert_ffn=FFN),
        optimizer=OptimizerSpec(name="adam", lr=1e-2),
        expert_pool=ExpertPoolSpec(**{"timeout_s": 5.0, "max_batch_rows": 40_000, **pool}),
    )


def reference(manifest: Manifest, layer: int = 0) -> LocalDispatcher:
    uids = [f"text.{layer}.{i}" for i in range(E)]
    return LocalDispatcher({u: make_expert(u, HIDDEN, FFN, manifest.seed) for u in uids})


# ---- pure units (no network) ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_codecs_round_trip_and_refuse_garbage():
    x = torch.randn(300, 70)
    assert torch.equal(decode_tensor(encode_tensor(x, "none")), x)
    for codec, tolerance in (("fp16", 1e-3), ("blockwise8", 0.03)):
        y = decode_tensor(encode_tensor(x, codec))
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert ((y - x).norm() / x.norm()).item() < tolerance, codec
    assert len(encode_tensor(x, "blockwise8").buffer) < len(encode_tensor(x, "none").buffer) / 3.5
    bad = encode_tensor(x, "none")
    bad.buffer = bad.buffer[:-4]
    with pytest.raises(WireError, match="needs 84000 bytes"):
        decode_tensor(bad)
    with pytest.raises(WireError, match="more than the limit"):
        decode_tensor(encode_tensor(x), max_elements=1000)
    weird = runtime_pb2.Tensor(buffer=b"abc", size=[3], dtype="complex128")
    with pytest.raises(WireError, match="unsupported tensor dtype"):
        decode_tensor(weird)


@pytest.mark.timeout(30)
def test_choose_experts_to_host_spreads_peers():
    uids = [f"text.0.{i}" for i in range(8)]
    peers = [f"peer{i}" for i in range(4)]
    # peers starting together see the same (empty) counts: the hash tie-break must spread their picks
    picks = [tuple(choose_experts_to_host(uids, {}, 2, p)) for p in peers]
    assert len(set(picks)) == len(peers)
    assert len({u for pick in picks for u in pick}) >= 5
    # peers joining one after another fill the least-served experts first: all 8 covered exactly once
    served: dict[str, int] = {}
    for p in peers:
        for uid in choose_experts_to_host(uids, served, 2, p):
            served[uid] = served.get(uid, 0) + 1
    assert served == {u: 1 for u in uids}
    assert choose_experts_to_host(uids, {u: 3 for u in uids[1:]}, 1, "x") == [uids[0]]
    with pytest.raises(ValueError):
        choose_experts_to_host(uids, {}, -1, "x")
    # a lone peer with room for half the experts still covers every (modality, layer): else it could never train
    grid = [f"{m}.{layer}.{i}" for m in ("text", "image") for layer in range(2) for i in range(4)]
    for p in (f"peer{i}" for i in range(50)):
        groups = {uid.rsplit(".", 1)[0] for uid in choose_experts_to_host(grid, {}, 8, p)}
        assert groups == {"text.0", "text.1", "image.0", "image.1"}, p


@pytest.mark.timeout(30)
def test_batch_queue_merges_concurrent_callers():
    module = make_expert("text.0.0", HIDDEN, FFN, 0)
    sizes = []

    def compute(verb, tensors):
        sizes.append(tensors[0].shape[0])
        time.sleep(0.02)
        with torch.no_grad():
            return module(tensors[0])

    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = BatchQueue(compute, executor, max_batch_rows=64)
    inputs = [torch.randn(8, HIDDEN) for _ in range(10)]

    async def run():
        return await asyncio.gather(*(queue.submit("forward", (x,)) for x in inputs))

    outputs = asyncio.run(run())
    executor.shutdown()
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            assert torch.allclose(module(x), y, atol=1e-5)
    assert sum(sizes) == 80 and max(sizes) <= 64
    assert len(sizes) < 10  # callers that arrived while a batch ran were merged


@pytest.mark.timeout(30)
def test_backward_from_saved_activations_equals_autograd():
    torch.manual_seed(0)
    expert = make_expert("text.0.0", HIDDEN, FFN, 0)
    ref = _copy(expert)
    x, g = torch.randn(7, HIDDEN), torch.randn(7, HIDDEN)
    out, pre = expert.forward_saving(x)
    grad_x = expert.backward_saved(x, pre, g)
    x_ref = x.clone().requires_grad_(True)
    out_ref = ref(x_ref)
    out_ref.backward(g)
    assert torch.allclose(out, out_ref, atol=1e-6) and torch.allclose(grad_x, x_ref.grad, atol=1e-5)
    for (name, p), p_ref in zip(expert.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-5), name


@pytest.mark.timeout(30)
def test_activation_cache_is_bounded_private_and_single_use():
    entry = (torch.zeros(10, 4), torch.zeros(10, 4))  # 320 bytes
    cache = ActivationCache(max_bytes=1000, ttl_s=0.5)
    numbers = [cache.put("alice", "text.0.0", entry) for _ in range(4)]
    assert len(cache) == 3 and cache.nbytes == 960 and cache.dropped == 1  # the oldest went over the budget
    assert cache.take("alice", numbers[0], "text.0.0") is None
    assert cache.take("bob", numbers[1], "text.0.0") is None  # only the caller that made it may use it
    assert cache.take("alice", numbers[1], "text.0.1") is None  # ... for the expert it was made by
    assert cache.take("alice", numbers[1], "text.0.0").rows == 10
    assert cache.take("alice", numbers[1], "text.0.0") is None  # once
    assert cache.put("alice", "text.0.0", (torch.zeros(100, 4),) * 2) is None  # one entry over the budget
    assert cache.drop("text.0.1") == 0 and cache.drop("text.0.0") == 2 and cache.nbytes == 0
    number = cache.put("alice", "text.0.0", entry)
    time.sleep(0.6)
    assert cache.take("alice", number, "text.0.0") is None and len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError):
        ActivationCache(max_bytes=-1)


@pytest.mark.timeout(10)
def test_host_bans_back_off_exponentially():
    bans = HostBans(base_s=0.05, max_s=0.15)
    assert not bans.banned("p")
    assert bans.failure("p") == 0.05 and bans.banned("p") and bans.banned("p", "text.0.0")
    assert bans.failure("p") == 0.1 and bans.failure("p") == 0.15  # capped
    time.sleep(0.16)
    assert not bans.banned("p")
    bans.failure("q", "text.0.1")  # a refusal bans one expert of that host only
    assert bans.banned("q", "text.0.1") and not bans.banned("q", "text.0.2")
    bans.success("q", "text.0.1")
    assert not bans.banned("q", "text.0.1")


# ---- one server node + one client node in this process ---------------------------------------------------------


@pytest.fixture(scope="module")
def swarm():
    server_node = SwarmNode("pooltest", Identity.load_or_create(None), host_maddrs=LOOPBACK)
    client_node = SwarmNode(
        "pooltest", Identity.load_or_create(None), host_maddrs=LOOPBACK, initial_peers=server_node.visible_maddrs()
    )
    manifest = make_manifest(server_node.peer_id)
    server = ExpertServer(server_node.p2p, server_node.loop, manifest, max_rows=50_000)
    server.start()
    for i in range(E):
        server.add_expert(f"text.0.{i}")
    server_registry = ExpertRegistry(SwarmDirectory(server_node.dht, "pooltest", server_node.peer_id), server, 30)
    assert server_registry.publish()
    registry = ExpertRegistry(SwarmDirectory(client_node.dht, "pooltest", client_node.peer_id), None, 30)
    registry.refresh()
    dispatchers = []

    def make_dispatcher(node=client_node, registry=registry, **kwargs) -> RemoteDispatcher:
        kwargs.setdefault("codec", "none")  # exact comparisons with local experts ("auto" picks 8-bit on loopback)
        dispatchers.append(RemoteDispatcher(node.p2p, node.loop, registry, manifest, **kwargs))
        return dispatchers[-1]

    try:
        yield dict(server_node=server_node, client_node=client_node, manifest=manifest, server=server,
                   registry=registry, server_registry=server_registry, make_dispatcher=make_dispatcher)
    finally:
        for dispatcher in dispatchers:
            dispatcher.close()
        server.shutdown()
        client_node.shutdown()
        server_node.shutdown()


def _call_sync(swarm, verb, uid, tensors, codec="none"):
    node = swarm["client_node"]
    return node.loop.run(call_expert(node.p2p, swarm["server_node"].peer_id, verb, uid, tensors, codec), timeout=30)


@pytest.mark.timeout(60)
def test_remote_dispatch_matches_local_and_trains(swarm):
    manifest, server, node = swarm["manifest"], swarm["server"], swarm["client_node"]
    assert [peer for peer, _ in swarm["registry"].hosts("text.0.1")] == [swarm["server_node"].peer_id]
    dispatcher = swarm["make_dispatcher"]()
    assert dispatcher.live_mask("text", 0, E).all() and not dispatcher.live_mask("text", 1, E).any()
    torch.manual_seed(0)
    for trial in range(3):
        ref = LocalDispatcher({u: _copy(server.module(u)) for u in (f"text.0.{i}" for i in range(E))})
        before = {uid: load.version for uid, load in server.hosted().items()}
        n = (5, 24, 61)[trial]
        idx = torch.stack([torch.randperm(E)[:2] for _ in range(n)])
        x = torch.randn(n, HIDDEN, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, answered = dispatcher.dispatch(x, idx, "text", 0)
        out_ref, answered_ref = ref.dispatch(x_ref, idx, "text", 0)
        assert answered.all() and torch.equal(answered, answered_ref)
        assert torch.allclose(out, out_ref, atol=1e-5)
        grad = torch.randn_like(out)
        (out * grad).sum().backward()
        (out_ref * grad).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        used = set(f"text.0.{i}" for i in idx.unique().tolist())
        # one optimizer step per expert per backward batch, applied just after the gradients were answered
        after = _wait_for_steps(server, {uid: before[uid] + 1 for uid in used})
        for uid in used:
            assert after[uid].version == before[uid] + 1
            assert not torch.equal(server.module(uid).w1.weight, ref.experts[uid].w1.weight)
    assert dispatcher.stats.forward_failures == 0 and dispatcher.stats.backward_failures == 0
    assert dispatcher.stats.forward_calls == dispatcher.stats.backward_calls > 0

    # a lossy wire codec gives nearly the same outputs
    fp16 = swarm["make_dispatcher"](codec="fp16")
    x = torch.randn(16, HIDDEN)
    idx = torch.randint(0, E, (16, 2))
    with torch.no_grad():
        out, answered = fp16.dispatch(x, idx, "text", 0)
        exact, _ = dispatcher.dispatch(x, idx, "text", 0)
    assert answered.all() and torch.allclose(out, exact, atol=1e-2)


@pytest.mark.timeout(60)
def test_backward_uses_kept_activations_and_resends_x_when_they_are_gone(swarm):
    """A training forward makes the host keep its activations; backward then sends grad_out only. If the host has
    dropped them, it says so and the caller resends x: same gradients, no failure, no ban."""
    server = swarm["server"]
    dispatcher = swarm["make_dispatcher"]()
    idx = torch.tensor([[0, 1]] * 12)
    kept_before = len(server.activations)
    versions = {uid: load.version for uid, load in server.hosted().items()}
    for gone in (False, True):
        _wait_for_steps(server, versions)  # the previous backward's steps are done before the reference copy
        versions = {uid: v + (uid in ("text.0.0", "text.0.1")) for uid, v in versions.items()}
        ref = LocalDispatcher({u: _copy(server.module(u)) for u in (f"text.0.{i}" for i in range(E))})
        x = torch.randn(12, HIDDEN, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, answered = dispatcher.dispatch(x, idx, "text", 0)
        out_ref, _ = ref.dispatch(x_ref, idx, "text", 0)
        assert answered.all() and len(server.activations) == kept_before + 2
        if gone:
            assert server.activations.drop() == kept_before + 2
        sent = dispatcher.stats.bytes_sent
        grad = torch.randn_like(out)
        (out * grad).sum().backward()
        (out_ref * grad).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        grad_bytes = 2 * 12 * HIDDEN * 4
        assert dispatcher.stats.bytes_sent - sent == (3 * grad_bytes if gone else grad_bytes)  # x only on resend
        assert dispatcher.stats.resent == (2 if gone else 0) and len(server.activations) == 0
        kept_before = 0
    assert dispatcher.stats.backward_failures == 0 and not dispatcher.bans.banned(swarm["server_node"].peer_id)
    with torch.no_grad():  # evaluation keeps nothing
        dispatcher.dispatch(torch.randn(12, HIDDEN), idx, "text", 0)
    assert len(server.activations) == 0


@pytest.mark.timeout(60)
def test_local_server_experts_run_in_process(swarm):
    """On the server's own node, its experts are called without the network (local_calls), same results."""
    node, server = swarm["server_node"], swarm["server"]
    dispatcher = swarm["make_dispatcher"](node=node, registry=swarm["server_registry"], local_server=server)
    ref = LocalDispatcher({u: _copy(server.module(u)) for u in (f"text.0.{i}" for i in range(E))})
    version = server.hosted()["text.0.2"].version
    x = torch.randn(10, HIDDEN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    idx = torch.tensor([[2, 3]] * 10)
    out, answered = dispatcher.dispatch(x, idx, "text", 0)
    out_ref, _ = ref.dispatch(x_ref, idx, "text", 0)
    out.sum().backward()
    out_ref.sum().backward()
    assert answered.all() and torch.allclose(out, out_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert dispatcher.stats.local_calls == 4 and server.hosted()["text.0.2"].version == version + 1


@pytest.mark.timeout(60)
def test_bad_requests_get_clear_errors_and_server_keeps_serving(swarm):
    server, manifest = swarm["server"], swarm["manifest"]
    versions = {uid: load.version for uid, load in server.hosted().items()}
    good = torch.randn(4, HIDDEN)
    nan = good.clone()
    nan[1, 3] = float("nan")
    cases = [
        ("forward", "text.1.0", [good], "not hosted by this peer"),
        ("forward", "text.0.0", [torch.randn(4, HIDDEN + 1)], f"must have shape \\[rows, {HIDDEN}\\]"),
        ("forward", "text.0.0", [torch.randn(2, 4, HIDDEN)], "must have shape"),
        ("forward", "text.0.0", [good.double()], "must be float32, got torch.float64"),
        ("backward", "text.0.0", [good, nan], "grad_out of text.0.0 contains NaN or Inf"),
        ("backward", "text.0.0", [good, good[:3]], "has 3 rows but x has 4"),
        ("backward", "text.0.0", [good], "takes tensors \\['x', 'grad_out'\\], got 1"),
        ("forward", "text.0.0", [torch.randn(50_001, HIDDEN)], "more than the limit"),
    ]
    for verb, uid, tensors, message in cases:
        with pytest.raises(ExpertCallError, match=message) as info:
            _call_sync(swarm, verb, uid, tensors)
        assert info.value.refused
    # undecodable bytes: garbage metadata, a tensor buffer that does not match its header
    node, peer = swarm["client_node"], swarm["server_node"].peer_id
    garbage = [runtime_pb2.ExpertRequest(uid="text.0.0", metadata=b"\xc1\xff\x00")]
    with pytest.raises(ExpertCallError, match="undecodable metadata"):
        node.loop.run(_call(node.p2p, peer, "forward", garbage), timeout=30)
    broken = encode_tensor(good)
    broken.buffer = broken.buffer[:7]
    with pytest.raises(ExpertCallError, match="needs 512 bytes, got 7"):
        node.loop.run(_call(node.p2p, peer, "forward", pack_request("text.0.0", {}, [broken])), timeout=30)
    lying = [runtime_pb2.ExpertRequest(uid="text.0.0", metadata=msgpack.packb({"n_tensors": 3}))]
    with pytest.raises(ExpertCallError, match="announces 3 tensors"):
        node.loop.run(_call(node.p2p, peer, "forward", lying), timeout=30)
    # a backward quoting kept activations: a malformed quote or a row mismatch is refused; a number the server
    # does not keep (expired, evicted, restarted, someone else's) asks for x again and is no refusal
    def backward_quoting(quote, rows=good):
        request = pack_request("text.0.0", {"saved": quote}, [encode_tensor(rows)])
        return node.loop.run(_call(node.p2p, peer, "backward", request), timeout=30)

    for quote in ("seven", True, 1.5):
        with pytest.raises(ExpertCallError, match="'saved' must be an integer") as info:
            backward_quoting(quote)
        assert info.value.refused
    with pytest.raises(ExpertCallError, match="send x again") as info:
        backward_quoting(10**9)
    assert info.value.resend and not info.value.refused
    keep = pack_request("text.0.0", {"keep": True}, [encode_tensor(good)])
    meta, _ = node.loop.run(_call(node.p2p, peer, "forward", keep), timeout=30)
    with pytest.raises(ExpertCallError, match="grad_out has 3 rows but forward call"):
        backward_quoting(meta["saved"], good[:3])
    # nothing reached an optimizer, and the server still answers good requests
    assert {uid: load.version for uid, load in server.hosted().items()} == versions
    assert server.rejected >= len(cases) + 3
    (out,) = _call_sync(swarm, "forward", "text.0.0", [good])
    assert torch.allclose(out, server.forward_local("text.0.0", good), atol=1e-6)
    with pytest.raises(ValueError, match="contains NaN"):
        server.backward_local("text.0.0", good, nan)


@pytest.mark.timeout(60)
def test_session_refuses_bad_calls_and_survives(swarm):
    """On one rpc_session stream: bad calls get their own error reply, good calls around them still work, and a
    stream that cannot be parsed is closed (its pending calls fail) while new sessions work."""
    node, server = swarm["client_node"], swarm["server"]
    peer = swarm["server_node"].peer_id
    good = torch.randn(3, HIDDEN)
    nan = good.clone()
    nan[0, 0] = float("inf")

    async def scenario():
        session = HostSession(node.p2p, peer)
        await session.open()
        results = await asyncio.gather(
            session.call("explode", "text.0.0", {}, [encode_tensor(good)]),
            session.call("forward", "text.0.0", {}, [encode_tensor(good)]),
            session.call("backward", "text.0.1", {}, [encode_tensor(good), encode_tensor(nan)]),
            session.call("forward", "text.3.0", {}, [encode_tensor(good)]),
            session.call("forward", "text.0.2", {}, [encode_tensor(good)]),
        )
        # a message that cannot be split into calls: the host answers the calls before it, then closes the session
        broken = runtime_pb2.ExpertRequest(uid="text.0.0", metadata=msgpack.packb({"n_msgs": "many", "id": 99}))
        pending = asyncio.ensure_future(session.call("forward", "text.0.0", {}, [encode_tensor(good)]))
        await asyncio.sleep(0)
        async with session._write_lock:
            await P2P.send_protobuf(broken, session._writer)
        before_break = await asyncio.wait_for(pending, 10)
        for _ in range(100):
            if session.closed:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(SessionError, match="closed"):
            await session.call("forward", "text.0.0", {}, [encode_tensor(good)])
        results.append(before_break)
        abrupt = HostSession(node.p2p, peer)  # a caller that vanishes with a call in flight
        await abrupt.open()
        vanished = asyncio.ensure_future(abrupt.call("backward", "text.0.3", {}, [encode_tensor(good)] * 2))
        await asyncio.sleep(0.01)
        abrupt._writer.close()
        await asyncio.wait_for(asyncio.gather(vanished, return_exceptions=True), 10)
        fresh = HostSession(node.p2p, peer)
        await fresh.open()
        again = await fresh.call("forward", "text.0.2", {}, [encode_tensor(good)])
        await fresh.close()
        await session.close()
        return results, session.closed, again

    versions = {uid: load.version for uid, load in server.hosted().items()}
    (unknown_verb, ok, refused_nan, unknown_uid, ok2, ok3), closed, again = node.loop.run(scenario(), timeout=60)
    assert "unknown verb 'explode'" in unknown_verb.meta["error"]
    assert "grad_out of text.0.1 contains NaN or Inf" in refused_nan.meta["error"]
    assert "not hosted by this peer" in unknown_uid.meta["error"]
    expected = server.forward_local("text.0.0", good)
    assert "error" not in ok.meta and torch.allclose(decode_tensor(ok.tensors[0]), expected, atol=1e-6)
    assert "error" not in ok2.meta and "error" not in ok3.meta and "error" not in again.meta and closed
    versions["text.0.3"] = server.hosted()["text.0.3"].version  # the vanished caller's backward may have run
    assert {uid: load.version for uid, load in server.hosted().items()} == versions  # no other optimizer step

    dispatcher = swarm["make_dispatcher"]()
    with pytest.raises(ValueError, match="NaN or Inf in x"):
        dispatcher.dispatch(nan, torch.tensor([[0, 1]] * 3), "text", 0)


@pytest.mark.gpu
@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_of_cuda_activations(swarm):
    server = swarm["server"]
    ref = LocalDispatcher({u: _copy(server.module(u)) for u in (f"text.0.{i}" for i in range(E))})
    x = torch.randn(20, HIDDEN, device="cuda", requires_grad=True)
    x_ref = x.detach().cpu().requires_grad_(True)
    idx = torch.randint(0, E, (20, 2), device="cuda")
    out, answered = swarm["make_dispatcher"]().dispatch(x, idx, "text", 0)
    out_ref, _ = ref.dispatch(x_ref, idx.cpu(), "text", 0)
    assert out.device.type == "cuda" and answered.device.type == "cuda" and answered.all()
    out.sum().backward()
    out_ref.sum().backward()
    assert torch.allclose(out.cpu(), out_ref, atol=1e-5) and torch.allclose(x.grad.cpu(), x_ref.grad, atol=1e-5)


@pytest.mark.timeout(90)
def test_payload_over_4mib_streams(swarm):
    server = swarm["server"]
    rows = 5 * 2**20 // (4 * HIDDEN)  # 5 MiB of float32 per tensor: over hivemind's 4 MiB message cap
    x, g = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN)
    (out,) = _call_sync(swarm, "forward", "text.0.3", [x])
    assert torch.allclose(out, server.forward_local("text.0.3", x), atol=1e-5)
    reference_module = _copy(server.module("text.0.3"))
    (grad_x,) = _call_sync(swarm, "backward", "text.0.3", [x, g])
    x_ref = x.clone().requires_grad_(True)
    reference_module(x_ref).backward(g)
    assert torch.allclose(grad_x, x_ref.grad, atol=1e-4)


@pytest.mark.timeout(60)
def test_state_fetch_and_refused_expert_is_retried_after_ban(swarm):
    node, server, manifest = swarm["client_node"], swarm["server"], swarm["manifest"]
    peer = swarm["server_node"].peer_id
    state = node.loop.run(fetch_expert_state(node.p2p, peer, "text.0.1"), timeout=30)
    assert state.keys() == server.state_dict("text.0.1").keys()
    assert all(torch.equal(state[k], v) for k, v in server.state_dict("text.0.1").items())

    dispatcher = swarm["make_dispatcher"](bans=HostBans(base_s=0.3))
    saved = server.state_dict("text.0.1")
    server.remove_expert("text.0.1")  # the registry still lists it: the host refuses, the expert is not answered
    try:
        x, idx = torch.randn(6, HIDDEN), torch.tensor([[1, 2]] * 6)
        out, answered = dispatcher.dispatch(x, idx, "text", 0)
        assert not answered[:, 0].any() and answered[:, 1].all() and (out[:, 0] == 0).all()
        assert not dispatcher.live_mask("text", 0, E)[1] and dispatcher.live_mask("text", 0, E)[2]
    finally:
        server.add_expert("text.0.1")
        server.load_state_dict("text.0.1", saved)
    time.sleep(0.35)  # the ban expires and the host is tried again
    assert dispatcher.live_mask("text", 0, E)[1]
    _, answered = dispatcher.dispatch(x, idx, "text", 0)
    assert answered.all()


@pytest.mark.timeout(60)
def test_registry_expires_dead_records(swarm):
    node = swarm["client_node"]  # has published nothing yet: a short-lived record under its own subkey
    other = ExpertServer(node.p2p, node.loop, swarm["manifest"])
    other.add_expert("text.1.2")
    publisher = ExpertRegistry(SwarmDirectory(node.dht, "pooltest", node.peer_id), other, ttl_s=1.5)
    assert publisher.publish()
    registry = swarm["registry"]
    registry.refresh()
    assert [p for p, _ in registry.hosts("text.1.2")] == [node.peer_id]
    assert registry.served_counts(["text.1.2", "text.1.3", "text.0.0"]) == {"text.1.2": 1, "text.1.3": 0, "text.0.0": 1}
    time.sleep(1.7)  # no republish: the cached entry expires without a refresh
    assert registry.hosts("text.1.2") == []
    registry.refresh()
    assert registry.hosts("text.1.2") == [] and registry.hosts("text.0.0")
    other.shutdown()


# ---- a server in another process, killed mid-training -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_server_process_makes_its_experts_not_answered(tmp_path):
    coordinator = Identity.load_or_create(str(tmp_path / "coordinator.key"))
    manifest = make_manifest(coordinator.peer_id, run_id="pooltest-kill", timeout_s=3.0)
    (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
    _set_child_subreaper(True)  # the killed host's DHT process and p2pd get reparented to us, and reaped here
    host = subprocess.Popen(
        [sys.executable, "-m", "swarmtrain.expert_pool.host", "--manifest", str(tmp_path / "manifest.json"),
         "--experts", "text.0.0", "text.0.1", "--refresh-s", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    node = None
    try:
        ready = json.loads(host.stdout.readline())
        node = SwarmNode("pooltest-kill", Identity.load_or_create(None), host_maddrs=LOOPBACK,
                         initial_peers=ready["maddrs"], trusted_coordinator=coordinator.peer_id)
        local = ExpertServer(node.p2p, node.loop, manifest)
        local.add_expert("text.0.2")
        registry = ExpertRegistry(SwarmDirectory(node.dht, "pooltest-kill", node.peer_id), local, 30)
        registry.refresh()
        dispatcher = RemoteDispatcher(node.p2p, node.loop, registry, manifest, local_server=local)
        assert dispatcher.live_mask("text", 0, E).tolist() == [True, True, True, False]
        idx = torch.tensor([[0, 2], [1, 2], [0, 1]] * 4)
        for step in range(3):  # training works across processes
            x = torch.randn(12, HIDDEN, requires_grad=True)
            out, answered = dispatcher.dispatch(x, idx, "text", 0)
            assert answered.all()
            out.pow(2).sum().backward()
            assert x.grad.abs().sum() > 0
        # kill the host process (with its DHT process and p2pd) between the forward and the backward of a step
        x = torch.randn(12, HIDDEN, requires_grad=True)
        out, answered = dispatcher.dispatch(x, idx, "text", 0)
        _kill_group(host)
        started = time.monotonic()
        out.pow(2).sum().backward()  # remote backward fails: zero grad for those rows, no exception
        assert dispatcher.stats.backward_failures == 2
        local_rows = (idx == 2).any(dim=1)
        assert (x.grad[~local_rows] == 0).all() and (x.grad[local_rows] != 0).any()
        out, answered = dispatcher.dispatch(torch.randn(12, HIDDEN), idx, "text", 0)
        assert time.monotonic() - started < 2 * manifest.expert_pool.timeout_s
        assert answered[idx == 2].all() and not answered[idx != 2].any()
        assert dispatcher.live_mask("text", 0, E).tolist() == [False, False, True, False]
    finally:
        if host.poll() is None:
            _kill_group(host)
        _set_child_subreaper(False)
        if node is not None:
            node.shutdown()


def _set_child_subreaper(enabled: bool) -> None:
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process group we started and reap all its members (they are our children or reparented to us)."""
    import psutil

    members = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    for pid in members:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:  # not (yet) reparented to us, or already reaped
                if not psutil.pid_exists(pid) or psutil.Process(pid).ppid() not in (os.getpid(), 1):
                    break
            time.sleep(0.05)
    leftover = [pid for pid in members if psutil.pid_exists(pid)]
    assert not leftover, f"processes of the killed host are still there: {leftover}"


def _wait_for_steps(server: ExpertServer, versions: dict[str, int], timeout: float = 10.0) -> dict:
    """``server.hosted()`` once every expert in ``versions`` took that many optimizer steps (they follow the answer
    of a backward asynchronously), or at the timeout."""
    deadline = time.monotonic() + timeout
    while any(server.hosted()[uid].version < v for uid, v in versions.items()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.hosted()


def _copy(module):
    clone = make_expert("text.0.0", HIDDEN, FFN, 0)
    clone.load_state_dict(module.state_dict())
    return clone


def test_optimizer_step_runs_after_the_answer_and_before_the_next_batch():
    """BatchQueue's ``after_backward`` (the server's optimizer step) starts only after the backward's caller has its
    gradient, and the expert's next batch waits until it is done."""
    import asyncio
    import concurrent.futures

    from swarmtrain.expert_pool.batching import BatchQueue

    events: list[str] = []

    def compute(verb, tensors):
        events.append(f"compute {verb}")
        return tensors[0] * 2

    def after_backward():
        events.append("finish backward start")
        time.sleep(0.1)
        events.append("finish backward end")

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            queue = BatchQueue(compute, pool, max_batch_rows=64, after_backward=after_backward)

            async def backward():
                out = await queue.submit("backward", (torch.ones(2, 4), torch.ones(2, 4)))
                events.append("backward answered")
                return out

            async def forward_later():
                await asyncio.sleep(0.02)  # arrives while the step runs
                out = await queue.submit("forward", (torch.ones(3, 4),))
                events.append("forward answered")
                return out

            grad, out = await asyncio.gather(backward(), forward_later())
            assert torch.equal(grad, torch.full((2, 4), 2.0)) and torch.equal(out, torch.full((3, 4), 2.0))

    asyncio.run(scenario())
    assert events.index("backward answered") < events.index("finish backward end"), events
    assert events.index("finish backward end") < events.index("compute forward"), events
