"""The swarm in the network lab (scripts/netlab.py): real processes on namespace hosts joined by a switch.

- a peer whose cable is cut (a black hole: no refusal, packets vanish) keeps training on its own experts, the
  survivors' training is not held up by it for long, and it averages with them again soon after the link is back;
- ``--max-upload-mbps`` holds on the host's interface counters.

The figures the goals are about (2 s stalls, 5 s rejoin, 10% of the cap) are measured by
``benchmarks/home_links.py`` on an idle machine; the bounds here are looser so that a loaded 2-core CI box passes
while a regression (a survivor stalled for the old 14 s, a cut host that stops, an unpaced uplink) fails.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import swarmtrain_cmd, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import netlab  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns]
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture
def lab_factory():
    missing = netlab.missing_requirements(delay_line=False)
    if missing:
        pytest.fail(f"the network lab needs {', '.join(missing)} (root, iproute2)")
    labs = []

    def make(hosts: int) -> netlab.Lab:
        labs.append(netlab.Lab(hosts, subnet="10.213.91"))
        return labs[-1]

    yield make
    for lab in labs:
        lab.close()


def start_swarm(lab: netlab.Lab, tmp_path: Path, peers: int, *extra: str, manifest: str = "") -> list[Path]:
    """A coordinator on host 0 (``manifest``: TOML lines of its [manifest] table) and ``peers`` peers on hosts
    1..peers; returns their progress files."""
    maddrs, config = tmp_path / "maddrs", tmp_path / "run.toml"
    config.write_text("[manifest]\n" + manifest)
    lab.spawn(0, swarmtrain_cmd("coordinator", "--run-id", "lab", "--identity", str(tmp_path / "c.key"),
                                "--maddrs-file", str(maddrs), "--checkpoint-every-s", "0", "--config", str(config)),
              tmp_path / "coordinator.log", env=ENV)
    ip = lab.host(0).ip
    maddr = wait_for(lambda: maddrs.exists() and next((m for m in maddrs.read_text().split() if f"/ip4/{ip}/" in m),
                                                      None), 90, what="the coordinator's multiaddr")
    files = [tmp_path / f"peer{i}.jsonl" for i in range(1, peers + 1)]
    for i, path in enumerate(files, start=1):
        lab.spawn(i, swarmtrain_cmd("peer", "--run-id", "lab", "--initial-peers", maddr, "--threads", "1",
                                    "--progress-file", str(path), *extra), tmp_path / f"peer{i}.log", env=ENV)
    wait_for(lambda: all(progress(p) for p in files), 240, interval=1, what="every peer's first training step")
    return files


def progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # being written
            pass
    return lines


def steps_between(lines: list[dict], a: float, b: float) -> int:
    return sum(a <= line["t"] <= b for line in lines)


def longest_gap(lines: list[dict], a: float, b: float) -> float:
    times = [a] + [line["t"] for line in lines if a < line["t"] < b] + [b]
    return max(y - x for x, y in zip(times, times[1:]))


@pytest.mark.timeout(420)
def test_a_cut_peer_keeps_training_survivors_barely_stall_and_it_rejoins(lab_factory, tmp_path):
    lab = lab_factory(4)
    files = start_swarm(lab, tmp_path, 3)
    time.sleep(20)  # every peer has met the others (calls measured, averaging partners known)
    cut_start = time.time()
    lab.link_down(3)
    time.sleep(20)
    lab.link_up(3)
    cut_end = time.time()
    cut_peer = files[-1]

    def rejoined():
        lines = progress(cut_peer)
        before = max((line["averaging_rounds"] for line in lines if line["t"] <= cut_end), default=0)
        return next((line["t"] for line in lines if line["t"] > cut_end and line["averaging_rounds"] > before), None)

    rejoin_at = wait_for(rejoined, 60, interval=1, what="the cut peer's first exchange after the link came back")
    survivors = [progress(path) for path in files[:-1]]
    cut = progress(cut_peer)
    report = {"cut_steps": steps_between(cut, cut_start, cut_end),
              "cut_steps_before": steps_between(cut, cut_start - 20, cut_start),
              "survivor_gaps": [longest_gap(s, cut_start, cut_end) for s in survivors],
              "rejoin_s": rejoin_at - cut_end}
    print(report)
    # the cut peer trained on what it could reach (the benchmark asks half its rate; here a third)
    assert report["cut_steps"] >= report["cut_steps_before"] / 3, report
    # before adaptive deadlines, every survivor stopped for ~14 s (the fixed expert-call timeout)
    assert max(report["survivor_gaps"]) <= 6.0, report
    assert report["rejoin_s"] <= 30.0, report


@pytest.mark.timeout(360)
def test_max_upload_mbps_holds_on_the_interface(lab_factory, tmp_path):
    cap = 3.0
    lab = lab_factory(3)
    # without communication-aware routing half the expert calls are remote: the peers would send more than the cap
    start_swarm(lab, tmp_path, 2, "--max-upload-mbps", str(cap), manifest="[manifest.expert_pool]\ncomm_cost_weight = 0.0\n")
    with netlab.UploadMeter(lab, 1) as meter_1, netlab.UploadMeter(lab, 2) as meter_2:
        time.sleep(40)
    worst = max(meter_1.max_rate_mbps(window_s=10.0), meter_2.max_rate_mbps(window_s=10.0))
    mean = min(meter_1.mean_rate_mbps(), meter_2.mean_rate_mbps())
    print({"worst_10s_mbps": worst, "least_mean_mbps": mean})
    assert worst <= cap * 1.1  # the goal: within 10% over any 10 s window, on the lab interface's own counters
    assert mean >= cap * 0.5  # the peers did use their budget (else the test proves nothing)
