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
def test_delta_rule_keeps_local_progress_while_training(nodes):
    """Peer a trains (adds c per step under its lock) while averaging with b; the hand-computed rule:
    b_final = b0 - (b0 - a_snap)/2 and a_final = a0 + k*c + (b0 - a_snap)/2, where a_snap = a0 + j*c for some
    0 <= j <= k per element (the step at which that chunk was read)."""
    numel, c = 600_000, 0.25
    a0 = torch.arange(numel, dtype=torch.float32) % 1024
    b0 = 4096.0 - (torch.arange(numel, dtype=torch.float32) % 512)
    a, b = [a0.clone()], [b0.clone()]
    spec = AveragingSpec(period_s=QUIET, timeout_s=10, staleness_scaling=False, chunk_elems=1 << 16, max_rel_distance=100)
    lock_a = threading.Lock()
    avg_a = _averager(nodes[0], a, spec, "delta", lock=lock_a)
    avg_b = _averager(nodes[1], b, spec, "delta")
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
    expected_a = a0 + k * c + (b0 - a_snap) / 2
    assert torch.allclose(a[0], expected_a, atol=1e-3)
    assert torch.allclose(a[0] + b[0], a0 + b0 + k * c, atol=1e-3)  # the pair's sum keeps all local progress
    assert avg_a.stats().rounds == 1 and avg_b.stats().served == 1


@pytest.mark.timeout(60)
def test_bad_partners_are_rejected_and_leave_us_untouched(nodes):
    spec = AveragingSpec(period_s=QUIET, timeout_s=5)
    made = []

    def pair(group, ours, theirs, their_layout=None):
        mine = [torch.randn(5000), torch.randn(10)]
        other = [torch.randn(their_layout or 5000), torch.randn(10)]
        if theirs == "nan":
            other[1][3] = float("nan")
        made.extend([_averager(nodes[0], mine, spec, group), _averager(nodes[1], other, spec, group)])
        for avg in made[-2:]:
            avg.start()
        return made[-2], made[-1], mine, [t.clone() for t in mine]

    try:
        # we initiate, the partner's answer holds NaN
        ours, theirs, mine, before = pair("bad-a", "good", "nan")
        assert ours.average_once(nodes[1].peer_id) == "rejected"
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 1
        assert ours.penalties.banned(nodes[1].peer_id)
        # the partner initiates with NaN values: we refuse them
        ours, theirs, mine, before = pair("bad-b", "good", "nan")
        assert theirs.average_once(nodes[0].peer_id) == "rejected"
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 1
        # wrong sizes, both ways: refused at the first message
        ours, theirs, mine, before = pair("bad-c", "good", "good", their_layout=5001)
        assert ours.average_once(nodes[1].peer_id) == "rejected"
        assert theirs.average_once(nodes[0].peer_id) == "rejected"
        assert all(torch.equal(t, o) for t, o in zip(mine, before)) and ours.stats().rejected == 2
        assert ours.stats().rounds == 0 and ours.stats().bytes_received < 4096
    finally:
        for avg in made:
            avg.shutdown()


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
    spec = AveragingSpec(period_s=0.05, timeout_s=3, chunk_elems=1 << 16)
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
