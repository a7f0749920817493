"""The test swarm of tests/test_dashboard.py: real DHT nodes in child processes that publish signed records.

A coordinator publishes the signed manifest, peers publish heartbeats, expert and averaging records, and a rogue
stores forged records in its own DHT storage. Each child reports every record it published over a pipe, so the
tests can compare what the dashboard shows with what was really published. Children are started with the
'spawn' method and import only this module (not the test module).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.keys import RecordKind
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import AveragingRecord, ExpertLoad, ExpertsRecord, Heartbeat, Manifest, TrainingSpec
from swarmtrain.dht.validator import SwarmRecordValidator

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RUN_ID = "dash-test"
PERIOD_S = 1.0  # how often the children publish
HEARTBEAT = TrainingSpec(heartbeat_period_s=1.5, heartbeat_ttl_s=5.0)  # stale after 3 s, gone after <= 5 s
ALICE_EXPERTS = ("text.0.0", "text.0.1", "text.1.0")
BOB_EXPERTS = ("text.0.0", "image.0.0")
EVIL_NAME = "<img src=x onerror=document.title='pwned'>bob"  # a public name the page must show as text


@dataclass(frozen=True)
class MemberSpec:
    """What one child process of the test swarm does."""

    role: str  # "coordinator", "peer" or "rogue"
    key_path: str  # identity key file (created by the parent, so it knows every peer id up front)
    initial_peers: tuple[str, ...] = ()
    name: str = ""
    client_mode: bool = False
    relay_via: str = ""  # announce a /p2p-circuit address through this node's multiaddr
    modalities: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    samples_per_s: float = 0.0
    impersonate: str = ""  # rogue: the peer id its forged heartbeat claims


@dataclass(frozen=True)
class Hello:
    peer_id: str
    maddrs: list[str]


@dataclass(frozen=True)
class Published:
    kind: str
    payload: dict


class LenientValidator(SwarmRecordValidator):
    """A rogue's validator: signs its own records like an honest node but accepts anything into its storage."""

    def validate(self, record) -> bool:
        return True


def member_main(spec: MemberSpec, conn) -> None:
    """Entry point of a child: join the DHT, report the peer id, publish records every PERIOD_S until told."""
    import hivemind

    identity = Identity.load(spec.key_path)
    node: Optional[SwarmNode] = None
    if spec.role == "rogue":
        validator = LenientValidator(RUN_ID, identity, trusted_coordinator=identity.peer_id)
        dht = hivemind.DHT(initial_peers=list(spec.initial_peers), host_maddrs=[LOOPBACK],
                           identity_path=identity.path, record_validators=[validator], start=True)
    else:
        node = SwarmNode(RUN_ID, identity, initial_peers=spec.initial_peers, host_maddrs=[LOOPBACK],
                         client_mode=spec.client_mode, start_p2p=False)
        dht = node.dht
    directory = SwarmDirectory(dht, RUN_ID, identity.peer_id)
    maddrs = [str(m) for m in dht.get_visible_maddrs(latest=True)]
    if spec.relay_via:
        maddrs = [f"{spec.relay_via}/p2p-circuit/p2p/{identity.peer_id}"]
    conn.send(Hello(identity.peer_id, maddrs))
    started, step = time.time(), 0
    try:
        while not conn.poll(PERIOD_S):
            step += 1
            for kind, record in _records(spec, identity.peer_id, maddrs, started, step):
                if directory.publish(kind, record, ttl_s=60.0 if kind == RecordKind.MANIFEST else HEARTBEAT.heartbeat_ttl_s):
                    conn.send(Published(kind.value, record.model_dump(mode="json")))
    finally:
        if node is not None:
            node.shutdown()
        else:
            dht.shutdown()


def _records(spec: MemberSpec, peer_id: str, maddrs: list[str], started: float, step: int):
    now = time.time()
    if spec.role == "coordinator":
        if step == 1 or step % 5 == 0:
            yield RecordKind.MANIFEST, Manifest(
                run_id=RUN_ID, created_at=started, coordinator=peer_id, modalities=("text", "image"),
                experts_per_layer={"text": 2, "image": 2}, training=HEARTBEAT,
                resumed_from=started - 3600.0,  # as if resumed from an hour-old checkpoint (--resume)
            )
        yield RecordKind.PEERS, Heartbeat(peer_id=peer_id, role="coordinator", public_name="coordinator",
                                          version="test", maddrs=tuple(maddrs), started_at=started, time=now)
    elif spec.role == "peer":
        loss = 0.5 + 3.0 * math.exp(-0.05 * step)
        rounds = step // 2
        yield RecordKind.PEERS, Heartbeat(
            peer_id=peer_id, public_name=spec.name, version="0.1.0-test", device="cpu",
            modalities=spec.modalities, experts=spec.experts, maddrs=tuple(maddrs), client_mode=spec.client_mode,
            loss=loss, val_loss=loss + 0.1, val_loss_initial=3.6, losses={"text": loss},
            samples_per_s=spec.samples_per_s * (1.0 + 0.1 * math.sin(step)), steps=step, samples=16 * step,
            averaging_rounds=rounds, averaging_bytes=4096 * rounds, started_at=started, time=now,
        )
        yield RecordKind.EXPERTS, ExpertsRecord(
            peer_id=peer_id, experts={uid: ExpertLoad(load=10.0 + i, calls=step, version=step)
                                      for i, uid in enumerate(spec.experts)}, time=now)
        yield RecordKind.AVERAGING, AveragingRecord(peer_id=peer_id, groups=("replicated",), samples=16 * step,
                                                    time=now)
    elif spec.role == "rogue":
        # a self-signed manifest (not the coordinator's), a heartbeat that claims another peer's id, and an
        # expert record that fails its schema (negative load): each is stored in the rogue's own DHT storage
        yield RecordKind.MANIFEST, Manifest(
            run_id=RUN_ID, created_at=now, coordinator=peer_id, modalities=("text",),
            experts_per_layer={"text": 3}, training=HEARTBEAT,
        )
        yield RecordKind.PEERS, Heartbeat.model_construct(
            peer_id=spec.impersonate, public_name="mallory", samples_per_s=1e6, time=now, started_at=started)
        yield RecordKind.EXPERTS, ExpertsRecord.model_construct(
            peer_id=peer_id, experts={"text.1.1": ExpertLoad.model_construct(load=-1.0, calls=0, version=0)},
            time=now)


@dataclass
class Member:
    """The parent's handle on one child process; a thread keeps reading what the child reports."""

    spec: MemberSpec
    process: mp.Process
    conn: object
    peer_id: str = ""
    maddrs: list[str] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)
    hello: threading.Event = field(default_factory=threading.Event)

    def read_reports(self) -> None:
        """Runs in a thread: the child must never block on a full pipe, or its records would expire."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Hello):
                self.peer_id, self.maddrs = message.peer_id, message.maddrs
                self.hello.set()
            elif isinstance(message, Published):
                self.published.append(message)

    def heartbeat_at(self, t: float) -> Optional[dict]:
        """The heartbeat this member published with ``time == t``."""
        for message in list(self.published):
            if message.kind == RecordKind.PEERS.value and message.payload["time"] == t:
                return message.payload
        return None

    def tree(self) -> list[psutil.Process]:
        """The member process and everything it started (its DHT process and that one's p2pd)."""
        return process_tree(self.process.pid)

    def killprocess_tree(self, tree: Optional[list[psutil.Process]] = None) -> None:
        """SIGKILL the member and everything it started, as if its machine died."""
        tree = self.tree() if tree is None else tree
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        self.process.join(timeout=5)

    def request_stop(self) -> list[psutil.Process]:
        """Ask the member to shut its node down; returns its process tree to reap with :meth:`reap`."""
        tree = self.tree()
        try:
            self.conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        return tree

    def reap(self, tree: list[psutil.Process], deadline: float) -> None:
        """Wait for the member until ``deadline`` (monotonic), then kill whatever of its tree is left."""
        self.process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.killprocess_tree([p for p in tree if p.is_running()])


def start_member(spec: MemberSpec) -> Member:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=member_main, args=(spec, child), name=f"member-{spec.role}")
    process.start()
    child.close()
    member = Member(spec, process, parent)
    threading.Thread(target=member.read_reports, daemon=True, name=f"reports-{spec.role}").start()
    return member


def await_hello(member: Member, timeout: float = 60.0) -> Member:
    deadline = time.monotonic() + timeout
    while not member.hello.wait(0.2):
        if not member.process.is_alive():
            raise AssertionError(f"{member.spec.role} {member.spec.name!r} exited with {member.process.exitcode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{member.spec.role} {member.spec.name!r} did not start within {timeout:.0f}s")
    return member


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
