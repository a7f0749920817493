"""Tests of swarmtrain.averaging on real hivemind DHT nodes (p2pd) on 127.0.0.1.

Most tests share three in-process SwarmNodes (one per simulated peer; each test uses its own averaging group so
they do not interfere); the partner-killed test runs the partner in a separate process and kills it mid-exchange.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time

import psutil
import pytest
import torch

from swarmtrain.averaging.base import ParameterAverager
from swarmtrain.averaging.gossip import GossipAverager
from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import AveragingSpec

RUN = "avgtest"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]
QUIET = 3600.0  # a period so long that the background clock never fires during a test


def _own_p2pd() -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if p.name() == "p2pd"]


@pytest.fixture(scope="module")
def nodes():
    made = [SwarmNode(RUN, Identity.load_or_create(None), host_maddrs=LOCAL)]
    for _ in range(2):
        made.append(SwarmNode(RUN, Identity.load_or_create(None), initial_peers=made[0].visible_maddrs(),
                              host_maddrs=LOCAL))
    yield made
    for node in made:
        node.shutdown()
    deadline = time.monotonic() + 10
    while _own_p2pd() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _own_p2pd(), "p2pd daemons left behind"


def _averager(node, params, spec, group, lock=None, **kwargs) -> GossipAverager:
    directory = SwarmDirectory(node.dht, RUN, node.peer_id)
    return GossipAverager(node, directory, params, lock or threading.Lock(), spec, group=group, **kwargs)


def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.timeout(60)
def test_three_peers_converge_to_the_mean(nodes):
    gen = torch.Generator().manual_seed(0)
    params = [[torch.randn(3000, generator=gen), torch.randn(7, 11, generator=gen)] for _ in nodes]
    means = [torch.stack([p[j] for p in params]).mean(0) for j in range(2)]
    spec = AveragingSpec(period_s=0.1, timeout_s=5)
    averagers = [_averager(n, p, spec, "converge", seed=i) for i, (n, p) in enumerate(zip(nodes, params))]
    assert all(isinstance(a, ParameterAverager) for a in averagers)
    try:
        for a in averagers:
            a.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(_rel(p[j], means[j]) < 0.01 for p in params for j in range(2)):
                break
            time.sleep(0.05)
        rounds = sum(a.stats().rounds for a in averagers)
    finally:
        for a in averagers:
            a.shutdown()
    for j in range(2):  # every exchange preserves the pair's sum, so the mean never moves
        assert torch.allclose(torch.stack([p[j] for p in params]).mean(0), means[j], atol=1e-5)
    errors = [_rel(p[j], means[j]) for p in params for j in range(2)]
    assert max(errors) < 0.01, (errors, [a.stats() for a in averagers])
    # each exchange counts once on each side; pairwise averaging of 3 peers needs only a handful of exchanges
    assert 2 <= rounds // 2 <= 40, rounds
    stats = averagers[0].stats()
    assert stats.bytes_sent > 0 and stats.bytes_received > 0 and stats.failures == 0 and stats.rejected == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule", ["delta", "overwrite"])
def test_delta_rule_keeps_local_progress_while_training(nodes, rule):
    """Peer a trains (adds c per step under its lock) while averaging with b; the hand-computed rule:
    b_final = b0 - (b0 - a_snap)/2 and a_final = a0 + k*c + (b0 - a_snap)/2, where a_snap = a0 + j*c for some
    0 <= j <= k per element (the step at which that chunk was read). The naive "overwrite" rule instead sets
    a_final = (a_snap + b0)/2: the k - j steps a made during the exchange are lost."""
    numel, c = 600_000, 0.25
    a0 = torch.arange(numel, dtype=torch.float32) % 1024
    b0 = 4096.0 - (torch.arange(numel, dtype=torch.float32) % 512)
    a, b = [a0.clone()], [b0.clone()]
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=10, staleness_scaling=False, chunk_elems=1 << 16,
                         max_rel_distance=100, rule=rule)
    lock_a = threading.Lock()
    avg_a = _averager(nodes[0], a, spec, rule, lock=lock_a)
    avg_b = _averager(nodes[1], b, spec, rule)
    steps = 0
    stop = threading.Event()

    def train():
        nonlocal steps
        while not stop.is_set():
            with lock_a:
                a[0].add_(c)
                steps += 1
            avg_a.on_local_step(steps, steps)
            time.sleep(0.0005)

    trainer = threading.Thread(target=train)
    try:
        avg_b.start()
        trainer.start()
        while steps < 5:
            time.sleep(0.01)
        assert avg_a.average_once(nodes[1].peer_id) == "ok"
        k_returned = steps
        time.sleep(0.02)
    finally:
        stop.set()
        trainer.join()
        avg_a.shutdown()
        avg_b.shutdown()
    k = steps
    a_snap = 2 * b[0] - b0  # what b received, recovered from b's half of the rule
    j = (a_snap - a0) / c
    assert torch.allclose(j, j.round(), atol=1e-3) and j.min() >= 0 and j.max() <= k, (j.min(), j.max(), k)
    assert j.max() > 0, "training was not interleaved with the exchange"
    if rule == "overwrite":  # a = pair average from the snapshot + only the steps made after its chunk landed
        kept = (a[0] - (a_snap + b0) / 2) / c
        assert torch.allclose(kept, kept.round(), atol=1e-3), "a is not the snapshot's pair average + whole steps"
        assert kept.min() >= k - k_returned - 1e-3 and (kept <= k - j + 1e-3).all()
        assert float((k - j - kept).max()) > 0.5, "no local step was lost: the exchange did not overlap training"
    else:
        expected_a = a0 + k * c + (b0 - a_snap) / 2
        assert torch.allclose(a[0], expected_a, atol=1e-3)
        assert torch.allclose(a[0] + b[0], a0 + b0 + k * c, atol=1e-3)  # the pair's sum keeps all local progress
    assert avg_a.stats().rounds == 1 and avg_b.stats().served == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["none", "8bit"])
def test_bad_partners_are_rejected_and_leave_us_untouched(nodes, codec):
    spec = AveragingSpec(period_s=QUIET, timeout_s=5, codec=codec)
    made = []

    def pair(group, theirs, their_layout=None):
        mine = [torch.randn(5000), torch.randn(10)]
        other = [torch.randn(their_layout or 5000), torch.randn(10)]
        if theirs == "nan":
            other[0][7] = other[1][3] = float("nan")
        made.extend([_averager(nodes[0], mine, spec, group), _averager(nodes[1], other, spec, group)])
        for avg in made[-2:]:
            avg.start()
        return made[-2], made[-1], mine, [t.clone() for t in mine]

    try:
        # a peer whose parameters hold NaN initiates: it notices, sends nothing and blames nobody
        ours, theirs, mine, before = pair(f"bad-a-{codec}", "nan")
        assert theirs.average_once(nodes[0].peer_id) == "local"
        # we initiate: it refuses to answer; we stay untouched and skip it from now on
        assert ours.average_once(nodes[1].peer_id) == "rejected"
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 1
        assert ours.penalties.banned(nodes[1].peer_id)
        assert _eventually(lambda: theirs.stats().failures == 2)  # its side ends once we closed the stream
        assert not theirs.penalties.banned(nodes[0].peer_id)
        # a peer that sends NaN values anyway (a raw client on node 1 speaking the protocol): refused, banned
        ours, _, mine, before = pair(f"bad-b-{codec}", "good")
        reply = nodes[1].loop.run(_send_raw_exchange(nodes[1], nodes[0].peer_id, ours, spec))
        assert reply == ["accept", "refuse"]
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 1
        assert ours.penalties.banned(nodes[1].peer_id)
        # wrong sizes, both ways: refused at the first message
        ours, theirs, mine, before = pair(f"bad-c-{codec}", "good", their_layout=5001)
        assert ours.average_once(nodes[1].peer_id) == "rejected"
        assert theirs.average_once(nodes[0].peer_id) == "rejected"
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 2
        assert ours.stats().rounds == 0 and ours.stats().bytes_received < 4096
        if codec == "8bit":  # a chunk claiming to be a difference from a reference we do not share: refused
            ours, _, mine, before = pair("bad-d-8bit", "good")
            reply = nodes[1].loop.run(_send_raw_exchange(nodes[1], nodes[0].peer_id, ours, spec, relative=True))
            assert reply == ["accept", "refuse"]
            assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 1
    finally:
        for avg in made:
            avg.shutdown()


async def _send_raw_exchange(node, peer: str, target: GossipAverager, spec: AveragingSpec,
                             relative: bool = False) -> list[str]:
    """Speak rpc_exchange by hand: a valid hello, then a first chunk whose values hold NaN (or, ``relative``, a
    valid 8-bit chunk that claims to be a difference from a shared reference, with no reference shared)."""
    from hivemind.p2p import PeerID

    from swarmtrain.averaging import protocol
    from swarmtrain.averaging.codec import encode

    segment = target.replica.segments[0]
    values = torch.randn(segment.hi - segment.lo)
    if relative:
        message, _ = encode(values, "8bit", spec.blocksize)
    else:
        values[3] = float("nan")
        message, _ = encode(values, "none")  # float32 carries the NaN as it is

    async def requests():
        yield protocol.hello(target.group, target.replica.numel, target.replica.layout, spec.codec, spec.blocksize,
                             spec.chunk_elems, 1.0, ref=12345 if relative else None)
        yield protocol.request("chunk", message, o=segment.lo, **({"r": True} if relative else {}))

    stub = GossipAverager.get_stub(node.p2p, PeerID.from_base58(peer), namespace=target.namespace)
    replies = await stub.rpc_exchange(requests())
    return [protocol.parse(reply, ("accept", "refuse", "chunk"))[0] async for reply in replies]


@pytest.mark.timeout(60)
def test_load_state_from_peers_copies_exactly(nodes):
    spec = AveragingSpec(period_s=QUIET, timeout_s=5, chunk_elems=1 << 16)
    source = [torch.randn(300_000), torch.randn(3, 5).double(), torch.randn(17).half()]
    joiner = [torch.zeros(300_000), torch.zeros(3, 5).double(), torch.zeros(17).half()]
    lonely = _averager(nodes[2], [torch.zeros(3)], spec, "state-alone")
    assert lonely.load_state_from_peers(timeout_s=5) is False
    lonely.shutdown()
    avg_source = _averager(nodes[0], source, spec, "state")
    avg_joiner = _averager(nodes[1], joiner, spec, "state")
    try:
        avg_source.start()
        assert avg_joiner.load_state_from_peers(timeout_s=10) is True
    finally:
        avg_source.shutdown()
        avg_joiner.shutdown()
    assert all(torch.equal(s, j) for s, j in zip(source, joiner))
    assert avg_joiner.stats().bytes_received > 4 * 300_000


def _partner_process(initial_peers: list[str], numel: int, spec_json: str, conn) -> None:
    torch.set_num_threads(1)
    node = SwarmNode(RUN, Identity.load_or_create(None), initial_peers=initial_peers, host_maddrs=LOCAL)
    averager = _averager(node, [torch.randn(numel)], AveragingSpec.model_validate_json(spec_json), "killed")
    averager.start()
    conn.send(node.peer_id)
    conn.poll(120)  # killed long before; a pipe, not an Event: an Event's waiter killed mid-wait deadlocks set()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_partner_killed_midway_counts_a_failure_and_nothing_hangs(nodes):
    numel = 4_000_000
    spec = AveragingSpec(codec="none", period_s=0.05, timeout_s=3, chunk_elems=1 << 16)
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_partner_process, args=(nodes[0].visible_maddrs(), numel, spec.model_dump_json(),
                                                       child_end))
    child.start()
    ours = [torch.randn(numel)]
    lock = threading.Lock()
    averager = _averager(nodes[0], ours, spec, "killed", lock=lock)
    try:
        assert parent_end.poll(60), "partner process did not start"
        partner = parent_end.recv()
        tree = [psutil.Process(child.pid)] + psutil.Process(child.pid).children(recursive=True)
        averager.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # catch an exchange mid-stream: data flowing, not yet applied
            while not averager.busy and time.monotonic() < deadline:
                time.sleep(0.0002)
            rounds, received = averager.stats().rounds, averager.stats().bytes_received
            while averager.busy and averager.stats().bytes_received - received < numel:
                time.sleep(0.0002)
            with lock:
                at_kill = ours[0].clone()
            if averager.busy and averager.stats().rounds == rounds:
                for proc in tree:  # the partner's python process, its DHT process and its p2pd, all at once
                    _kill(proc)
                break
        else:
            pytest.fail("could not catch an exchange in flight")
        before = averager.stats()
        killed_at = time.monotonic()
        while averager.stats().failures == before.failures and time.monotonic() - killed_at < 3 * spec.timeout_s:
            time.sleep(0.01)
        failed_after_s = time.monotonic() - killed_at
        after = averager.stats()
        with lock:  # the trainer can still take its lock at once: the averager never holds it for long
            assert torch.equal(ours[0], at_kill), "the interrupted exchange changed our parameters"
    finally:
        started = time.monotonic()
        averager.shutdown()
        shutdown_s = time.monotonic() - started
        if child.is_alive():
            child.kill()
        child.join(10)
    assert after.failures > before.failures and after.rounds == before.rounds, after
    assert failed_after_s < spec.timeout_s + 1
    assert averager.penalties.banned(partner)  # the dead partner is skipped from now on
    assert shutdown_s < 10


def _kill(proc: psutil.Process) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


# ---- codec, error feedback and the exchange arithmetic (no network) ----


def test_codecs_round_trip_within_their_error_and_reject_bad_chunks():
    import bitsandbytes.functional as bnb_functional

    from swarmtrain.averaging.blockwise import Scratch
    from swarmtrain.averaging.codec import LocalDataError, WireError, decode, encode, plan_segments

    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(1))
    errors = {}
    for codec in ("none", "fp16", "8bit"):
        message, decoded = encode(x, codec, 4096)
        back, name = decode(message, x.numel(), 4096)
        assert name == codec and torch.equal(back, decoded)  # the sender knows exactly what the receiver sees
        errors[codec] = _rel(back, x)
    assert errors["none"] == 0 and errors["fp16"] < 1e-3 and errors["8bit"] <= 0.015, errors
    # the 8-bit path calls bitsandbytes' kernels into our own buffers: bit-identical to its torch ops
    qmap = bnb_functional.create_dynamic_map()
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default(x, qmap, 4096)
    reference = torch.ops.bitsandbytes.dequantize_blockwise.default(codes, absmax, qmap, 4096, torch.float32)
    message, _ = encode(x, "8bit", 4096, scratch=Scratch())
    assert message.buffer == absmax.numpy().tobytes() + codes.numpy().tobytes()
    assert torch.equal(decode(message, x.numel(), 4096, out=torch.empty(x.numel()))[0], reference)
    assert len(encode(x, "8bit", 4096)[0].buffer) < 1.01 * x.numel()  # 1 byte per element + absmax per block
    # small tensors (biases, norms) travel as float16 under the 8-bit codec; blocks never straddle tensors
    plan = plan_segments([100, 50_000, 7, 9, 300_000], "8bit", chunk_elems=1 << 16, blocksize=4096)
    assert [(s.lo, s.hi, s.codec) for s in plan] == [
        (0, 100, "fp16"), (100, 50_100, "8bit"), (50_100, 50_116, "fp16"),
        (50_116, 50_116 + 65_536, "8bit"), (50_116 + 65_536, 50_116 + 131_072, "8bit"),
        (50_116 + 131_072, 50_116 + 196_608, "8bit"), (50_116 + 196_608, 50_116 + 262_144, "8bit"),
        (50_116 + 262_144, 350_116, "8bit"),
    ]
    # consecutive large tensors share 8-bit segments (a block may straddle them); replicas order tensors large-first
    plan = plan_segments([50_000, 60_000, 8_192, 7, 9], "8bit", chunk_elems=1 << 16, blocksize=4096)
    assert [(s.lo, s.hi, s.codec) for s in plan] == [
        (0, 65_536, "8bit"), (65_536, 118_192, "8bit"), (118_192, 118_208, "fp16"),
    ]
    from swarmtrain.averaging.replica import wire_order

    tensors = [torch.zeros(100), torch.zeros(50_000), torch.zeros(7), torch.zeros(9), torch.zeros(300_000)]
    assert [t.numel() for t in wire_order(tensors)] == [50_000, 300_000, 100, 7, 9]
    message, _ = encode(x[:1000], "fp16")
    with pytest.raises(WireError, match="size"):
        decode(message, 999)
    message.buffer = message.buffer[:-2]
    with pytest.raises(WireError, match="bytes"):
        decode(message, 1000)
    bad = x[:5000].clone()
    bad[17] = float("nan")
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(encode(bad, "none")[0], 5000)
    for codec in ("fp16", "8bit"):  # 8-bit would turn the NaN into a finite number: the sender must refuse
        with pytest.raises(LocalDataError, match="NaN"):
            encode(bad, codec)
    with pytest.raises(LocalDataError, match="65504"):
        encode(torch.full((10,), 1e5), "fp16")
    message, _ = encode(x[:5000], "8bit")  # a forged block scale
    message.buffer = torch.tensor([float("inf")]).numpy().tobytes() + message.buffer[4:]
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(message, 5000)
    with pytest.raises(ValueError, match="unknown averaging codec"):
        encode(x[:10], "int4")


def test_entropy_coding_is_lossless_smaller_and_refuses_forged_frames():
    import zstandard

    from swarmtrain.averaging.codec import ENTROPY_CODED, WireError, decode, encode

    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(2))
    plain, decoded = encode(x, "8bit", 4096)
    packed, decoded_packed = encode(x, "8bit", 4096, entropy=True)
    assert packed.dtype == ENTROPY_CODED and torch.equal(decoded, decoded_packed)
    assert len(packed.buffer) < 0.9 * len(plain.buffer)  # ~7.07 bits of entropy per 8-bit code
    back, name = decode(packed, x.numel(), 4096)
    assert name == "8bit" and torch.equal(back, decoded)
    assert encode(x, "fp16", entropy=True)[0].dtype == "float16"  # only 8-bit messages are entropy-coded
    n = 5000  # forged frames: one that expands beyond the chunk's size, one of garbage, one of the wrong size
    expected = 4 * 2 + n
    for buffer, match in [
        (zstandard.ZstdCompressor().compress(bytes(expected * 100)), "expands"),
        (b"\x28\xb5\x2f\xfd" + bytes(range(60)), "undecodable|expands"),
        (zstandard.ZstdCompressor().compress(bytes(expected - 1)), "expands"),
    ]:
        forged = encode(x[:n], "8bit", 4096, entropy=True)[0]
        forged.buffer = buffer
        with pytest.raises(WireError, match=match):
            decode(forged, n, 4096)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(expected * 100))
    forged.buffer = unsized  # no size in the frame: never expanded beyond the chunk's size
    with pytest.raises(WireError):
        decode(forged, n, 4096)


def test_error_feedback_keeps_the_accumulated_error_bounded():
    """Sending the same slowly drifting vector T times: without error feedback the 8-bit errors add up
    (T times one step's error); with it the sum of what was sent stays within about one step's error."""
    from swarmtrain.averaging.codec import ErrorFeedback, encode

    gen = torch.Generator().manual_seed(2)
    base, drift = torch.randn(200_000, generator=gen), 1e-3 * torch.randn(200_000, generator=gen)
    feedback = ErrorFeedback(base.numel())
    meant_total = torch.zeros_like(base)
    plain_total = torch.zeros_like(base)
    fed_total = torch.zeros_like(base)
    for t in range(20):
        x = base + t * drift
        meant_total += x
        plain_total += encode(x, "8bit")[1]
        y = feedback.compensate(0, x)
        _, decoded = encode(y, "8bit")
        feedback.update(0, y, decoded)
        feedback.commit()
        fed_total += decoded
    one_step = float((encode(base, "8bit")[1] - base).norm())
    plain_err, fed_err = float((plain_total - meant_total).norm()), float((fed_total - meant_total).norm())
    assert plain_err > 10 * one_step
    assert fed_err < 1.5 * one_step and fed_err < plain_err / 10, (one_step, plain_err, fed_err)
    assert fed_err == pytest.approx(feedback.norm(), rel=1e-3)  # what is still owed is exactly the residual


@pytest.mark.timeout(60)
def test_8bit_only_moves_about_one_byte_per_element_and_adaptive_precision_more(nodes):
    """With ``adaptive_precision=False`` every exchange sends 8-bit values and 8-bit answers (~1 byte per element
    each way, no float16 and no sampled values), ~0.89 with ``entropy_coding``; by default, once the pair is close,
    the initiator's values go as float16 (~1.5 bytes per element). Either way the pair's sum is kept exactly."""
    numel = 1 << 20
    gen = torch.Generator().manual_seed(5)
    a0, b0 = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    moved = {}
    for adaptive, entropy in ((False, False), (True, False), (False, True)):
        a, b = [a0.clone()], [b0.clone()]
        spec = AveragingSpec(period_s=QUIET, timeout_s=20, codec="8bit", adaptive_precision=adaptive,
                             error_feedback=adaptive, entropy_coding=entropy, reference_partners=0)
        group = f"bytes{int(adaptive)}{int(entropy)}"
        avg_a, avg_b = _averager(nodes[0], a, spec, group), _averager(nodes[1], b, spec, group)
        try:
            avg_b.start()
            per_exchange = []
            for _ in range(3):
                before = avg_a.stats()
                outcome = avg_a.average_once(nodes[1].peer_id)
                if outcome == "unchanged" and adaptive and len(per_exchange) >= 2:
                    break  # float16 values made the pair agree: nothing left to average
                assert outcome == "ok"
                after = avg_a.stats()
                total = after.bytes_sent + after.bytes_received - before.bytes_sent - before.bytes_received
                per_exchange.append(total / (2 * numel))
        finally:
            avg_a.shutdown()
            avg_b.shutdown()
        assert torch.allclose(a[0] + b[0], a0 + b0, atol=1e-4)  # exact mass, whatever the codec dropped
        assert _rel(a[0], (a0 + b0) / 2) < 0.015 and _rel(b[0], (a0 + b0) / 2) < 0.015
        if not adaptive:
            assert avg_a.replica.feedback.residual is None  # no error feedback kept
        moved[adaptive, entropy] = per_exchange
    assert all(1.0 <= x <= 1.02 for x in moved[False, False]), moved
    assert max(moved[True, False][1:]) > 1.4, moved  # float16 values once the pair agrees to within 8-bit errors
    assert all(0.85 <= x <= 0.92 for x in moved[False, True]), moved  # zstd on the 8-bit codes: lossless, ~11% less


def test_shared_references_carry_8bit_differences_and_survive_a_lost_reference(nodes):
    """After a first exchange both sides keep the same reference vector; later exchanges of the pair (in either
    role) send 8-bit differences from it: ~1 byte per element, yet the pair ends far closer than 8-bit values
    leave it. If one side lost its reference, the tokens differ: that exchange runs plain, nothing fails."""
    numel = 1 << 20
    gen = torch.Generator().manual_seed(6)
    a0, b0 = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    a, b = [a0.clone()], [b0.clone()]
    spec = AveragingSpec(period_s=QUIET, timeout_s=20, codec="8bit", reference_partners=2, entropy_coding=False)
    avg_a, avg_b = _averager(nodes[0], a, spec, "refs"), _averager(nodes[1], b, spec, "refs")
    try:
        avg_a.start()
        avg_b.start()
        pa, pb = nodes[0].peer_id, nodes[1].peer_id

        def exchange(initiator, partner):
            before = initiator.stats()
            assert initiator.average_once(partner) == "ok"
            after = initiator.stats()
            moved = after.bytes_sent + after.bytes_received - before.bytes_sent - before.bytes_received
            return moved / (2 * numel), after.relative - before.relative

        per_elem, relative = exchange(avg_a, pb)
        assert relative == 0 and 1.0 <= per_elem <= 1.02  # first meeting: 8-bit values
        ref_a, ref_b = avg_a.replica.references, avg_b.replica.references
        token = ref_a.token(pb)
        assert token is not None and token == ref_b.token(pa)
        assert torch.equal(ref_a.get(pb, token), ref_b.get(pa, token))  # bit-identical on both sides
        plain_gap = _rel(a[0], b[0])
        assert plain_gap > 0.003  # 8-bit values leave the pair about 1% apart
        a[0].add_(0.01 * torch.randn(numel, generator=gen))  # "training" moves both a little
        b[0].add_(0.01 * torch.randn(numel, generator=gen))
        avg_a.on_local_step(1, 16)
        avg_b.on_local_step(1, 16)
        mass = a[0] + b[0]
        per_elem, relative = exchange(avg_b, pa)  # the other role, same reference
        assert relative == 1 and 1.0 <= per_elem <= 1.02
        assert torch.allclose(a[0] + b[0], mass, atol=1e-4)  # push-sum: the pair's sum is kept exactly
        assert _rel(a[0], b[0]) < plain_gap / 5, (_rel(a[0], b[0]), plain_gap)  # differences: far more precise
        assert ref_a.token(pb) == ref_b.token(pa) != token
        ref_b.drop(pa)  # one side lost it (e.g. a lost "done"): tokens differ, the exchange runs plain
        a[0].add_(0.01 * torch.randn(numel, generator=gen))
        avg_a.on_local_step(2, 32)
        per_elem, relative = exchange(avg_a, pb)
        assert relative == 0 and avg_a.stats().failures == avg_b.stats().failures == 0
        assert ref_a.token(pb) == ref_b.token(pa) is not None  # and a new shared reference is made
        assert avg_a.stats().relative + avg_b.stats().relative == 2  # both sides counted the relative exchange
    finally:
        avg_a.shutdown()
        avg_b.shutdown()


def test_pair_references_are_bounded_and_token_checked():
    from swarmtrain.averaging.references import PairReferences

    refs = PairReferences(4, max_partners=2)
    ones = torch.ones(4)
    for i, peer in enumerate(("p1", "p2", "p3")):
        refs.store(peer, 10 + i, ones, torch.full((4,), 2.0))
    assert len(refs) == 2 and refs.token("p1") is None  # the least recently used went first
    assert torch.equal(refs.get("p2", 11), torch.full((4,), 2.0))  # values + move / 2
    assert refs.get("p3", 99) is None and refs.token("p3") is None  # a wrong token drops it
    with pytest.raises(ValueError):
        refs.store("p4", 1, torch.ones(3), torch.ones(3))
    off = PairReferences(4, max_partners=0)
    off.store("p1", 1, ones, ones)
    assert len(off) == 0
    # a partner decoding a chunk relative to a reference: only 8-bit differences, only finite sums
    from swarmtrain.averaging.codec import WireError, encode
    from swarmtrain.averaging.replica import LocalReplica

    replica = LocalReplica([torch.randn(8192)], threading.Lock(), AveragingSpec(codec="8bit"), "refcheck")
    try:
        segment = replica.segments[0]
        reference = torch.randn(8192)
        good, _ = encode(torch.randn(8192) * 0.01, "8bit")
        reply, mode, _, _, _, _, theirs = replica.answer_chunk(good, segment, 4096, reference)
        assert mode in ("d", "v") and torch.allclose(theirs, reference, atol=0.1)
        with pytest.raises(WireError, match="must be 8-bit"):
            replica.answer_chunk(encode(torch.randn(8192), "fp16")[0], segment, 4096, reference)
        with pytest.raises(WireError, match="beyond float32 range"):
            huge = encode(torch.full((8192,), 3e38), "8bit", check_finite=False)[0]
            replica.answer_chunk(huge, segment, 4096, torch.full((8192,), 3e38))
    finally:
        replica.shutdown()


def test_exchange_rules_by_hand():
    from swarmtrain.averaging import rules

    assert rules.staleness_scale(0) == 1.0 and rules.staleness_scale(3) == 0.5
    with pytest.raises(ValueError):
        rules.staleness_scale(-1)
    # push-sum: weights 1 and 3, full mixing: both land on the weighted mean, weights on their mean
    xs, xp, ws, wp = 10.0, 2.0, 1.0, 3.0
    alpha_s, ws2 = rules.mixing(ws, wp, 1.0)
    alpha_p, wp2 = rules.mixing(wp, ws, 1.0)
    assert (ws2, wp2) == (2.0, 2.0)
    assert xs + alpha_s * (xp - xs) == pytest.approx(4.0) and xp + alpha_p * (xs - xp) == pytest.approx(4.0)
    # any partial factor keeps sum(w) and sum(w * x)
    for factor in (0.0, 0.3, 1.0):
        a_s, n_s = rules.mixing(ws, wp, factor)
        a_p, n_p = rules.mixing(wp, ws, factor)
        new_s, new_p = xs + a_s * (xp - xs), xp + a_p * (xs - xp)
        assert n_s + n_p == pytest.approx(ws + wp)
        assert n_s * new_s + n_p * new_p == pytest.approx(ws * xs + wp * xp)
    assert rules.clip_factor(10.0, None) == 1.0 and rules.clip_factor(10.0, 2.0) == 0.2
    assert rules.is_outlier(50.0, 10.0, 10.0, 4.0) and not rules.is_outlier(30.0, 10.0, 10.0, 4.0)
    # DiLoCo outer step: g = outer - target, m = g, outer -= lr * (g + mu * m)
    outer = rules.OuterNesterov(torch.tensor([1.0, -2.0]), lr=0.7, momentum=0.9)
    new = outer.step(torch.tensor([0.0, 0.0]))
    assert torch.allclose(new, torch.tensor([1.0 - 0.7 * 1.9, -2.0 + 0.7 * 3.8]))
    new = outer.step(torch.tensor([0.0, 0.0]))  # momentum carries over: m = 0.9 * g1 + g2
    g2 = torch.tensor([1.0 - 0.7 * 1.9, -2.0 + 0.7 * 3.8])
    m2 = 0.9 * torch.tensor([1.0, -2.0]) + g2
    assert torch.allclose(new, g2 - 0.7 * (g2 + 0.9 * m2))


# ---- the full design on real nodes ----


@pytest.mark.timeout(60)
def test_staleness_scales_the_delta_by_one_over_sqrt_one_plus_tau(nodes):
    """The initiator's trainer reports steps (without touching the parameters) during the exchange: the pair
    moves by f/2 of its distance with f = 1/sqrt(1 + tau) for an integer tau <= the steps taken, on both sides."""
    numel = 400_000
    a0, b0 = torch.randn(numel), torch.randn(numel)
    a, b = [a0.clone()], [b0.clone()]
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=10, chunk_elems=1 << 14)
    avg_a, avg_b = _averager(nodes[0], a, spec, "stale"), _averager(nodes[1], b, spec, "stale")
    stop, steps = threading.Event(), [0]

    def report_steps():
        while not stop.is_set():
            steps[0] += 1
            avg_a.on_local_step(steps[0], steps[0])
            time.sleep(0.002)

    ticker = threading.Thread(target=report_steps)
    try:
        avg_b.start()
        ticker.start()
        assert avg_a.average_once(nodes[1].peer_id) == "ok"
    finally:
        stop.set()
        ticker.join()
        avg_a.shutdown()
        avg_b.shutdown()
    f = float((b0 - b[0]).norm() / (0.5 * (b0 - a0).norm()))
    tau = 1.0 / f**2 - 1.0
    assert 1 <= round(tau) <= steps[0] and abs(tau - round(tau)) < 0.05, (f, tau, steps[0])
    assert torch.allclose(a[0], a0 + f / 2 * (b0 - a0), atol=1e-5)
    assert torch.allclose(b[0], b0 - f / 2 * (b0 - a0), atol=1e-5)
    assert avg_a.weight == avg_b.weight == 1.0

    # above max_staleness the exchange is dropped on both sides and nothing moves
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=10, chunk_elems=1 << 14, max_staleness=0)
    a1, b1 = a[0].clone(), b[0].clone()
    avg_a, avg_b = _averager(nodes[0], a, spec, "stale2"), _averager(nodes[1], b, spec, "stale2")
    stop.clear()
    ticker = threading.Thread(target=report_steps)
    try:
        avg_b.start()
        ticker.start()
        assert avg_a.average_once(nodes[1].peer_id) == "stale"
        time.sleep(0.2)
    finally:
        stop.set()
        ticker.join()
        avg_a.shutdown()
        avg_b.shutdown()
    assert torch.equal(a[0], a1) and torch.equal(b[0], b1)
    assert avg_a.stats().stale_dropped == 1 and avg_b.stats().stale_dropped == 1


@pytest.mark.timeout(90)
def test_push_sum_converges_to_the_weighted_mean_also_after_a_peer_dies(nodes):
    """Weights 1, 2, 3; peer 3 has its own node and dies mid-exchange; the survivors converge to
    sum(w x) / sum(w) of what they hold after its death (the invariant every exchange keeps)."""
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=3, chunk_elems=1 << 14)
    values = [torch.randn(600_000) + 3 * i for i in range(3)]
    params = [[v.clone()] for v in values]
    extra = SwarmNode(RUN, Identity.load_or_create(None), initial_peers=nodes[0].visible_maddrs(), host_maddrs=LOCAL)
    hosts = [nodes[0], nodes[1], extra]
    averagers = [_averager(h, p, spec, "pushsum", weight=w) for h, p, w in zip(hosts, params, (1.0, 2.0, 3.0))]
    try:
        for avg in averagers:
            avg.start()
        assert averagers[0].average_once(nodes[1].peer_id) == "ok"  # weights 1, 2 -> 1.5, 1.5
        assert averagers[0].weight == averagers[1].weight == 1.5
        done = []
        received = averagers[1].stats().bytes_received
        def exchange_with_extra():
            deadline = time.monotonic() + 10
            # "busy" until averager 1 has finished serving the exchange above (a legitimate answer): ask again
            while (outcome := averagers[1].average_once(extra.peer_id)) == "busy" and time.monotonic() < deadline:
                time.sleep(0.01)
            done.append(outcome)

        exchange = threading.Thread(target=exchange_with_extra)
        exchange.start()
        while averagers[1].stats().bytes_received - received < 1_000_000 and not done:
            time.sleep(0.0005)
        extra.shutdown()  # its p2pd and DHT go away mid-exchange
        exchange.join(30)
        assert done and done[0] in ("failed", "ok"), done
        w = [averagers[0].weight, averagers[1].weight]
        target = (w[0] * params[0][0] + w[1] * params[1][0]) / (w[0] + w[1])
        for _ in range(6):
            averagers[0].average_once(nodes[1].peer_id)
        for p in params[:2]:
            assert torch.allclose(p[0], target, atol=1e-4)
        if done[0] == "failed":  # it died before its half was applied: the survivors never saw any of it
            assert float((target - (values[0] + 2 * values[1]) / 3).abs().max()) < 1e-4
    finally:
        for avg in averagers:
            avg.shutdown()
        if extra.dht.is_alive():
            extra.shutdown()


@pytest.mark.timeout(60)
def test_load_parameters_replaces_values_in_constructor_order_and_reanchors_the_replica(nodes):
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=5, mode="diloco")
    params = [torch.zeros(3), torch.zeros(300, 1000)]  # the replica sends the large tensor first (wire order)
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.randn(300, 1000)]
    averager = _averager(nodes[0], params, spec, "load-params")
    try:
        averager.start()  # diloco: the outer optimizer anchors at the values of start()
        averager.load_parameters(values)
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        assert averager.replica.version == 1  # partners may not treat us as unchanged
        assert torch.equal(averager.replica.outer.outer, averager.replica.snapshot())  # re-anchored at the new values
        with pytest.raises(ValueError, match="shapes"):
            averager.load_parameters([torch.zeros(3), torch.zeros(1000, 300)])
        assert all(torch.equal(p, v) for p, v in zip(params, values))
    finally:
        averager.shutdown()


def test_diloco_mode_applies_an_outer_nesterov_step_to_the_pair_average(nodes):
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=10, mode="diloco", outer_lr=0.7, outer_momentum=0.9)
    a0, b0 = torch.randn(20_000), torch.randn(20_000)
    a, b = [a0.clone()], [b0.clone()]
    avg_a, avg_b = _averager(nodes[0], a, spec, "diloco"), _averager(nodes[1], b, spec, "diloco")
    try:
        avg_a.start()
        avg_b.start()
        assert avg_a.average_once(nodes[1].peer_id) == "ok"
    finally:
        avg_a.shutdown()
        avg_b.shutdown()
    target = (a0 + b0) / 2  # pair average; outer = the parameters at start(); first step: m = g
    for x0, x in ((a0, a[0]), (b0, b[0])):
        g = x0 - target
        assert torch.allclose(x, x0 - 0.7 * (g + 0.9 * g), atol=1e-5)


@pytest.mark.timeout(60)
def test_outliers_are_rejected_and_clipping_bounds_the_move(nodes):
    spec = AveragingSpec(codec="none", period_s=QUIET, timeout_s=5, max_rel_distance=4.0)
    near, far = [torch.randn(10_000)], [50 * torch.randn(10_000)]
    near0, far0 = near[0].clone(), far[0].clone()
    avg_near, avg_far = _averager(nodes[0], near, spec, "outlier"), _averager(nodes[1], far, spec, "outlier")
    try:
        avg_near.start()
        avg_far.start()
        assert avg_near.average_once(nodes[1].peer_id) == "rejected"
        assert avg_near.penalties.banned(nodes[1].peer_id)
    finally:
        avg_near.shutdown()
        avg_far.shutdown()
    assert torch.equal(near[0], near0) and torch.equal(far[0], far0)

    clip = AveragingSpec(codec="none", period_s=QUIET, timeout_s=5, clip_rel=0.1)
    a0, b0 = torch.randn(10_000), torch.randn(10_000)
    a, b = [a0.clone()], [b0.clone()]
    avg_a, avg_b = _averager(nodes[0], a, clip, "clip"), _averager(nodes[1], b, clip, "clip")
    try:
        avg_a.start()
        avg_b.start()
        assert avg_a.average_once(nodes[1].peer_id) == "ok"
    finally:
        avg_a.shutdown()
        avg_b.shutdown()
    radius = 0.1 * float(a0.norm())  # each side moves by half the clipped distance, toward the other
    assert float((a[0] - a0).norm()) == pytest.approx(radius / 2, rel=1e-4)
    assert torch.allclose(a[0] - a0, -(b[0] - b0), atol=1e-6)
    assert torch.allclose((a[0] - a0) / (a[0] - a0).norm(), (b0 - a0) / (b0 - a0).norm(), atol=1e-5)


@pytest.mark.timeout(60)
def test_expert_replicas_average_in_their_own_group_beside_the_replicated_one(nodes):
    from swarmtrain.averaging.rendezvous import Rendezvous

    spec = AveragingSpec(period_s=0.1, timeout_s=5, codec="8bit")
    uid = "text.0.3"
    shared = [torch.randn(50_000) for _ in range(3)]
    expert = [torch.randn(30_000) + 5 for _ in range(2)]  # only nodes 0 and 1 host a replica of the expert
    shared_mean, expert_mean = torch.stack(shared).mean(0), torch.stack(expert).mean(0)
    averagers = []
    for i, node in enumerate(nodes):
        rendezvous = Rendezvous(SwarmDirectory(node.dht, RUN, node.peer_id), ttl_s=10)
        averagers.append(_averager(node, [shared[i]], spec, "replicated-x", rendezvous=rendezvous, seed=i))
        if i < 2:
            averagers.append(_averager(node, [expert[i]], spec, uid, rendezvous=rendezvous, seed=10 + i))
    try:
        for avg in averagers:
            avg.start()
        records = SwarmDirectory(nodes[2].dht, RUN, nodes[2].peer_id).averaging()
        assert set(records[nodes[0].peer_id].groups) == {"replicated-x", uid}  # one record per node
        assert set(records[nodes[2].peer_id].groups) == {"replicated-x"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if max(_rel(x, shared_mean) for x in shared) < 0.01 and max(_rel(x, expert_mean) for x in expert) < 0.01:
                break
            time.sleep(0.05)
        stats = [avg.stats() for avg in averagers]  # before shutdown, which breaks off exchanges in flight
    finally:
        for avg in averagers:
            avg.shutdown()
    assert max(_rel(x, shared_mean) for x in shared) < 0.01
    assert max(_rel(x, expert_mean) for x in expert) < 0.01
    assert all(s.failures == 0 and s.rejected == 0 for s in stats), stats


def test_partner_choice_prefers_the_least_recently_met_and_skips_the_previous_partner():
    """Least recently met first; the previous partner only when nobody else is there (else two pairs that find
    each other busy would keep averaging among themselves and the swarm would split into pairs)."""
    import random

    from swarmtrain.averaging.rendezvous import choose_partners

    rng = random.Random(0)
    last_met = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert choose_partners(["a", "b", "c", "d"], last_met, rng) == ["d", "b", "c"]
    assert choose_partners(["a", "b", "c"], last_met, rng, last="b") == ["c", "a"]
    assert choose_partners(["b"], last_met, rng, last="b") == ["b"]
