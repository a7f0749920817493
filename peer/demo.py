"""A local demo swarm: one coordinator and N volunteer peers, each a separate OS process on 127.0.0.1.

The demo itself is only a launcher and an observer: it starts the processes with the same ``swarmtrain``
commands a user would type, watches the swarm through a read-only client DHT node, prints a live progress line,
and at the end stops everyone (SIGTERM, then SIGKILL to each process group so no p2pd is left behind) and reports
what it measured.
"""
from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from swarmtrain.peer.status import SwarmObserver

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# several processes share few cores: OpenMP threads that spin while waiting steal them from the others
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


class Demo:
    """Runs the demo described by :class:`~swarmtrain.peer.config.DemoOptions`; ``run()`` returns the results."""

    def __init__(self, options):
        self.options = options
        self.workdir = options.workdir or tempfile.mkdtemp(prefix="swarmtrain-demo-")
        os.makedirs(self.workdir, exist_ok=True)
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self._reported_exits: set[str] = set()
        self.latest: dict[str, dict] = {}  # peer id -> newest heartbeat seen
        self.expert_counts: dict[str, int] = {}

    def run(self) -> dict:
        started = time.monotonic()
        observer: Optional[SwarmObserver] = None
        try:
            maddrs = self._start_coordinator()
            print(f"coordinator is up; join this swarm by hand with:\n"
                  f"  swarmtrain peer --run-id {self.options.run_id} --initial-peers {maddrs[0]}", flush=True)
            if self.options.dashboard_port:
                print(f"dashboard: http://127.0.0.1:{self.options.dashboard_port}/", flush=True)
            print(f"logs and checkpoints: {self.workdir}", flush=True)
            observer = SwarmObserver(self.options.run_id, maddrs, host_maddrs=[LOOPBACK])
            manifest = self._wait_for_manifest(observer)
            experts_total = sum(manifest["experts_per_layer"][m] for m in manifest["modalities"]) * manifest["model"]["layers"]
            max_experts = self.options.max_experts or math.ceil(experts_total / self.options.peers)
            for index in range(self.options.peers):
                self._start_peer(index, maddrs[0], max_experts)
                time.sleep(1.5)  # lets each peer see the experts the previous ones took
            self._watch(observer, started)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the swarm", flush=True)
        finally:
            self._stop_peers(observer)
            self._stop_all()
            if observer is not None:
                observer.close()
        return self._result(time.monotonic() - started)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(os.path.join(self.workdir, f"{name}.log"), "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "swarmtrain.peer", *args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                env=dict(os.environ, **CHILD_ENV),
            )
        self.processes.append((name, process))
        return process

    def _start_coordinator(self) -> list[str]:
        maddrs_file = os.path.join(self.workdir, "coordinator.maddrs")
        args = ["coordinator", "--run-id", self.options.run_id, "--host-maddrs", LOOPBACK,
                "--identity", os.path.join(self.workdir, "coordinator.key"), "--maddrs-file", maddrs_file,
                "--checkpoint-dir", os.path.join(self.workdir, "checkpoints"), "--checkpoint-every-s", "60"]
        if self.options.coordinator_config:
            args += ["--config", self.options.coordinator_config]
        if self.options.dashboard_port:
            args += ["--dashboard-port", str(self.options.dashboard_port)]
        process = self._spawn("coordinator", args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the coordinator exited with code {process.returncode}; see {self.workdir}/coordinator.log")
            if os.path.exists(maddrs_file):
                with open(maddrs_file) as f:
                    maddrs = f.read().split()
                if maddrs:
                    return maddrs
            time.sleep(0.2)
        raise RuntimeError(f"the coordinator did not come up within 60 s; see {self.workdir}/coordinator.log")

    def _start_peer(self, index: int, maddr: str, max_experts: int) -> None:
        self._spawn(f"peer-{index}", [
            "peer", "--run-id", self.options.run_id, "--initial-peers", maddr, "--host-maddrs", LOOPBACK,
            "--identity", os.path.join(self.workdir, f"peer-{index}.key"), "--public-name", f"demo-peer-{index}",
            "--data-shard", f"{index}/{self.options.peers}", "--max-experts", str(max_experts),
            "--threads", str(self.options.threads),
        ])

    def _wait_for_manifest(self, observer: SwarmObserver) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            manifest = observer.snapshot()["manifest"]
            if manifest is not None:
                return manifest
            time.sleep(0.5)
        raise RuntimeError("the demo observer never saw the coordinator's manifest")

    def _watch(self, observer: SwarmObserver, started: float) -> None:
        duration = self.options.duration
        while duration == 0 or time.monotonic() - started < duration:
            for name, process in self.processes:
                if process.poll() is not None and name not in self._reported_exits:
                    self._reported_exits.add(name)  # the handle stays: its process group is still killed at the end
                    print(f"{name} exited with code {process.returncode}; see {self.workdir}/{name}.log", flush=True)
            self._observe(observer)
            print(self._progress_line(time.monotonic() - started), flush=True)
            time.sleep(2.0)

    def _observe(self, observer: SwarmObserver) -> None:
        snapshot = observer.snapshot()
        for peer, heartbeat in snapshot["peers"].items():
            if heartbeat["role"] == "peer" and heartbeat["time"] >= self.latest.get(peer, {}).get("time", 0):
                self.latest[peer] = heartbeat
        if snapshot["experts"]:
            counts: dict[str, int] = {}
            for uid, hosts in snapshot["experts"].items():
                if hosts:
                    modality = uid.split(".")[0]
                    counts[modality] = counts.get(modality, 0) + 1
            self.expert_counts = counts

    def _progress_line(self, elapsed: float) -> str:
        beats = list(self.latest.values())
        duration = self.options.duration
        bar = ""
        if duration:
            done = min(1.0, elapsed / duration)
            bar = "[" + "#" * int(done * 20) + "." * (20 - int(done * 20)) + "] "
        val = [b["val_loss"] for b in beats if b["val_loss"] is not None]
        start = [b["val_loss_initial"] for b in beats if b["val_loss_initial"] is not None]
        loss = [b["loss"] for b in beats if b["loss"] is not None]
        experts = " ".join(f"{m}:{n}" for m, n in sorted(self.expert_counts.items()))
        return (f"{bar}{elapsed:5.0f}s peers {len(beats)} | experts {experts or '-'} | "
                f"steps {sum(b['steps'] for b in beats)} | {sum(b['samples_per_s'] for b in beats):.0f} samples/s | "
                f"loss {_fmt(_mean(loss))} | val {_fmt(_mean(val))} (start {_fmt(_mean(start))}) | "
                f"averaging rounds {sum(b['averaging_rounds'] for b in beats)}")

    def _stop_peers(self, observer: Optional[SwarmObserver]) -> None:
        """SIGTERM the peers; each evaluates once more and publishes a final heartbeat before it exits."""
        _terminate_leaders([p for n, p in self.processes if n.startswith("peer-")], timeout_s=30)
        if observer is not None:
            try:
                self._observe(observer)
            except Exception as e:  # e.g. the observer's p2pd got the terminal's Ctrl+C too
                print(f"could not read the peers' final heartbeats ({e}); reporting the last ones seen", flush=True)

    def _stop_all(self) -> None:
        processes = [p for _, p in self.processes]
        _terminate_leaders(processes, timeout_s=15)
        for process in processes:
            _signal_group(process, signal.SIGKILL)  # whatever is left of the group (DHT process, p2pd)
            process.wait()

    def _result(self, wall_s: float) -> dict:
        beats = list(self.latest.values())
        start = [b["val_loss_initial"] for b in beats if b["val_loss_initial"] is not None]
        end = [b["val_loss"] for b in beats if b["val_loss"] is not None]
        return {
            "peers": len(beats),
            "experts": dict(sorted(self.expert_counts.items())),
            "steps": sum(b["steps"] for b in beats),
            "samples": sum(b["samples"] for b in beats),
            "val_loss_start": _mean(start),
            "val_loss_end": _mean(end),
            "averaging_rounds": sum(b["averaging_rounds"] for b in beats),
            "averaging_failures": sum(b["averaging_failures"] for b in beats),
            "samples_per_s": sum(b["samples_per_s"] for b in beats),
            "wall_s": round(wall_s, 2),
            "workdir": self.workdir,
        }


def _mean(values: list[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _terminate_leaders(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM each group leader still running (only the leader: its DHT process and p2pd must outlive its
    goodbye), then wait for them all until a shared deadline."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the demo process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass
