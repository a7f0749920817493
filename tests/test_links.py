"""Home-link policies as pure functions: call deadlines, hedging, wire codec and routing cost from measured calls;
the upload budget's pacing; communication-aware routing in the gate; local coverage when choosing experts to host;
partner penalties that let a peer whose cable came back rejoin at once."""
from __future__ import annotations

import time

import pytest
import torch

from swarmtrain.averaging.rendezvous import Penalties
from swarmtrain.dht.budget import BULK, INTERACTIVE, UploadBudget
from swarmtrain.dht.uids import make_uid
from swarmtrain.expert_pool.links import (
    FAST_LINK_BPS, LinkPolicy, LinkStats, LinkTable, call_cost, call_deadline, hedge_after, wire_codec,
)
from swarmtrain.expert_pool.registry import coverage_gaps
from swarmtrain.peer.model import MoE

POLICY = LinkPolicy(min_deadline_s=0.5, max_deadline_s=15.0, unknown_deadline_s=4.0, slack=3.0)


def stats_of(calls: list[tuple[float, int, float]]) -> LinkStats:
    stats = LinkStats()
    for seconds, nbytes, server_s in calls:
        stats.observe(seconds, nbytes, server_s)
    return stats


def test_deadline_of_an_unmeasured_host_is_the_unknown_deadline_not_the_manifest_timeout():
    assert call_deadline(None, 10_000, POLICY) == 4.0
    assert call_deadline(stats_of([(0.01, 1000, 0.0)] * 2), 10_000, POLICY) == 4.0  # fewer than 3 calls


def test_deadline_follows_the_hosts_latency_percentiles_and_the_bytes_to_move():
    lan = stats_of([(0.02, 50_000, 0.01)] * 30 + [(0.05, 50_000, 0.01)] * 2)
    assert call_deadline(lan, 50_000, POLICY) == 0.5  # 3 x p95 (0.15 s) is under the floor
    # a home link: ~0.4 s per call of 100 kB, 0.05 s of it compute -> ~290 kB/s measured
    home = stats_of([(0.4, 100_000, 0.05)] * 20)
    small, large = call_deadline(home, 1_000, POLICY), call_deadline(home, 2_000_000, POLICY)
    assert 1.2 <= small < 1.3  # 3 x 0.4 s + the transfer of 1 kB
    assert large > small + 10  # 2 MB take ~7 s at that rate: twice that is allowed
    assert call_deadline(home, 50_000_000, POLICY) == 15.0  # never beyond the manifest's timeout


def test_late_answers_widen_a_slow_hosts_deadline():
    table = LinkTable(POLICY)
    for _ in range(10):
        table.observe("h", 0.05, 20_000, 0.01)
    before = table.deadline("h", 20_000)
    for _ in range(3):
        table.observe_late("h", 2.0)  # answers that came after their call had given up
    assert table.deadline("h", 20_000) >= 6.0 > before
    assert table.summary()["h"]["late"] == 3


def test_hedging_starts_after_one_and_a_half_p95():
    assert hedge_after(None, POLICY) == 0.5
    assert hedge_after(stats_of([(0.2, 1000, 0.0)] * 10), POLICY) == pytest.approx(0.3)
    assert hedge_after(stats_of([(0.01, 1000, 0.0)] * 10), POLICY) == 0.25  # never below half the floor


def test_auto_codec_is_8bit_until_a_link_is_measured_faster_than_the_codec():
    assert wire_codec(None, "auto") == "blockwise8"
    slow = stats_of([(0.1, 100_000, 0.0)] * 10)  # 1 MB/s
    fast = stats_of([(0.002, 200_000, 0.001)] * 10)  # 200 MB/s of network time
    assert slow.rate_bps() == pytest.approx(1e6) and fast.rate_bps() > FAST_LINK_BPS
    assert wire_codec(slow, "auto") == "blockwise8"
    assert wire_codec(fast, "auto") == "none"
    assert wire_codec(slow, "none") == "none" and wire_codec(fast, "fp16") == "fp16"  # an explicit choice stays
    assert stats_of([(0.01, 1000, 0.0)] * 10).rate_bps() is None  # small calls say nothing about bandwidth


def test_call_cost_grows_with_the_hosts_median_latency():
    assert call_cost(None, POLICY) == 1.0
    assert call_cost(stats_of([(0.005, 1000, 0.0)] * 5), POLICY) == POLICY.remote_floor
    assert call_cost(stats_of([(0.1, 1000, 0.0)] * 5), POLICY) == pytest.approx(0.4)
    assert call_cost(stats_of([(3.0, 1000, 0.0)] * 5), POLICY) == 1.0


def test_upload_budget_paces_bulk_behind_interactive_traffic():
    budget = UploadBudget(8.0, overhead=0.0)  # 1 MB/s
    assert budget.schedule(500_000, BULK, now=0.0) == 0.0  # the link is free: the first bulk message goes at once
    assert budget.schedule(100_000, INTERACTIVE, now=0.0) == 0.0  # expert traffic does not wait for bulk
    # the next bulk message waits for the first (0.5 s) and for the interactive bytes (0.1 s)
    assert budget.schedule(100_000, BULK, now=0.0) == pytest.approx(0.6)
    assert budget.schedule(100_000, INTERACTIVE, now=0.0) == pytest.approx(0.1)  # behind earlier interactive only
    assert budget.sent == {INTERACTIVE: 200_000, BULK: 600_000}
    # over a long run both classes together never exceed the rate
    budget = UploadBudget(8.0, overhead=0.0)
    now, last_free = 0.0, 0.0
    for i in range(1000):
        kind = INTERACTIVE if i % 3 else BULK
        last_free = max(last_free, now + budget.schedule(50_000, kind, now))
        now += 0.01
    assert sum(budget.sent.values()) / (last_free + 0.05) <= 1.0e6 * 1.01


def test_upload_budget_unlimited_and_bad_values():
    free = UploadBudget(None)
    assert not free.limited and free.schedule(10**9, BULK, 0.0) == 0.0
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            UploadBudget(bad)
    with pytest.raises(ValueError):
        free.schedule(1, "urgent", 0.0)


class CostDispatcher:
    """Experts in this process (as LocalDispatcher) with made-up call costs: experts 0 and 1 'hosted here'."""

    def __init__(self, experts: dict, costs: list[float]):
        self.experts, self.costs, self.calls = experts, torch.tensor(costs), []

    def live_mask(self, modality, layer, num_experts):
        return torch.ones(num_experts, dtype=torch.bool)

    def call_costs(self, modality, layer, num_experts):
        return self.costs

    def dispatch(self, x, expert_idx, modality, layer):
        self.calls.append(expert_idx.clone())
        n, k = expert_idx.shape
        out = torch.stack([torch.stack([self.experts[int(e)](x[i]) for e in expert_idx[i]]) for i in range(n)])
        return out, torch.ones(n, k, dtype=torch.bool)


def test_communication_aware_routing_prefers_cheap_experts_and_keeps_the_gates_weights():
    torch.manual_seed(0)
    experts = {i: torch.nn.Linear(8, 8) for i in range(4)}
    x = torch.randn(256, 8)
    costs = [0.0, 0.0, 1.0, 1.0]
    plain = MoE(8, "text", 0, num_experts=4, top_k=2, k_min=1)
    aware = MoE(8, "text", 0, num_experts=4, top_k=2, k_min=1, comm_cost_weight=4.0)
    aware.gate.load_state_dict(plain.gate.state_dict())
    d_plain, d_aware = CostDispatcher(experts, costs), CostDispatcher(experts, costs)
    plain(x, d_plain)
    y, aux = aware(x, d_aware)
    remote = lambda d: float((d.calls[-1] >= 2).float().mean())  # noqa: E731
    assert remote(d_plain) > 0.3 and remote(d_aware) < 0.05
    # the weights of the chosen experts are the gate's own softmax over them, and gradients reach the gate
    (y.sum() + aux).backward()
    assert aware.gate.weight.grad is not None and aware.gate.weight.grad.abs().sum() > 0
    # a strongly preferred remote expert is still chosen
    with torch.no_grad():
        aware.gate.weight.zero_()
        aware.gate.weight[3] = 10 * x.new_ones(8)
    aware(x.abs() + 1, d_aware)
    assert (d_aware.calls[-1] == 3).any(dim=1).all()


def test_call_costs_of_the_wrong_shape_are_refused():
    moe = MoE(8, "text", 0, num_experts=4, top_k=2, k_min=1, comm_cost_weight=1.0)
    with pytest.raises(ValueError, match="call_costs"):
        moe(torch.randn(4, 8), CostDispatcher({i: torch.nn.Identity() for i in range(4)}, [0.0, 1.0]))


def test_coverage_gaps_give_every_layer_top_k_local_experts():
    uids = [make_uid(m, layer, i) for m in ("text", "image") for layer in range(2) for i in range(4)]
    hosted = {"text.0.0", "text.0.1", "image.1.2"}
    served = {uid: 1 for uid in uids}
    served["text.1.3"] = 0
    gaps = coverage_gaps(uids, hosted, served, per_group=2, capacity=100, peer_id="me")
    groups = {}
    for uid in list(hosted) + gaps:
        groups.setdefault(uid.rsplit(".", 1)[0], []).append(uid)
    assert sorted(len(v) for v in groups.values()) == [2, 2, 2, 2] and len(gaps) == 5
    assert "text.1.3" in gaps  # least served first
    limited = coverage_gaps(uids, hosted, served, per_group=2, capacity=3, peer_id="me")
    assert len(limited) == 3 and {u.rsplit(".", 1)[0] for u in limited} == {"text.1", "image.0", "image.1"}
    assert coverage_gaps(uids, hosted, served, per_group=2, capacity=0, peer_id="me") == []


def test_an_unreachable_partner_is_retried_soon_and_served_at_once_but_bad_data_is_not_forgiven():
    penalties = Penalties(base_s=8.0, max_unreachable_s=8.0)
    for _ in range(6):
        skip = penalties.strike("cut")
    assert skip <= 8.0 and penalties.banned("cut") and not penalties.distrusted("cut")
    skip = penalties.strike("liar", bad_data=True)
    assert skip >= 60 and penalties.banned("liar") and penalties.distrusted("liar")
    penalties.forgive("cut")
    assert not penalties.banned("cut")
    short = Penalties(base_s=0.05, max_unreachable_s=0.05)
    short.strike("cut")
    time.sleep(0.08)
    assert not short.banned("cut")


def test_a_host_not_measured_yet_gets_the_deadline_of_the_swarms_calls():
    table = LinkTable(POLICY)
    assert table.deadline("new", 1000) == POLICY.unknown_deadline_s  # nothing measured at all
    for host in ("a", "b"):
        for _ in range(5):
            table.observe(host, 0.05, 20_000, 0.01)
    assert table.deadline("new", 1000) == POLICY.min_deadline_s  # not the 4 s of a host of an unknown swarm
    assert table.hedge_after("new") == pytest.approx(0.25)


def test_a_peer_that_stalls_an_exchange_it_started_is_refused_for_its_ban():
    penalties = Penalties(base_s=8.0, max_unreachable_s=4.0)
    penalties.strike("staller", refuse=True)
    assert penalties.banned("staller") and penalties.distrusted("staller")


def test_a_timeout_bans_only_a_host_that_was_silent_since_the_request_left():
    from swarmtrain.expert_pool.links import SILENT, SLOW, UNSENT, classify_timeout

    assert classify_timeout(None, 5.0) == UNSENT  # still in our own upload queue: our uplink is the slow part
    assert classify_timeout(10.0, 12.0) == SLOW  # it answered something after our request left
    assert classify_timeout(10.0, 9.0) == SILENT and classify_timeout(10.0, None) == SILENT


def test_link_stats_ignore_non_finite_times():
    stats = LinkStats()
    stats.observe(float("nan"), 1000, 0.0)
    stats.observe(0.1, 100_000, float("inf"))
    assert len(stats.calls) == 0


def test_a_cancelled_booking_is_given_back():
    budget = UploadBudget(8.0, overhead=0.0)  # 1 MB/s
    budget.schedule(500_000, INTERACTIVE, now=0.0)
    assert budget.schedule(500_000, INTERACTIVE, now=0.0) == pytest.approx(0.5)
    budget.cancel(500_000, INTERACTIVE, now=0.1)
    assert budget.schedule(100_000, INTERACTIVE, now=0.1) == pytest.approx(0.4)
    assert budget.sent[INTERACTIVE] == 600_000


SS_OUTPUT = """ESTAB 0      0      10.0.0.2:45027 10.0.0.4:45891 users:(("p2pd",pid=26049,fd=15))
\t bbr wscale:10,10 rto:208 mss:1448 bytes_sent:4114795 bytes_retrans:21455 bytes_acked:4093340 segs_out:16129
ESTAB 468    0      10.0.0.2:45027 10.0.0.1:37441 users:(("p2pd",pid=26049,fd=12))
\t cubic wscale:10,10 rto:212 bytes_sent:4064175 bytes_acked:4040127 bytes_received:4092957
ESTAB 0      0      10.0.0.2:51234 10.0.0.9:80 users:(("curl",pid=777,fd=3))
\t cubic bytes_sent:999999
"""


def test_what_p2pd_sends_is_read_from_its_sockets_only():
    from swarmtrain.dht.uplink import parse_ss

    assert parse_ss(SS_OUTPUT, [26049]) == {("10.0.0.2:45027", "10.0.0.4:45891"): 4114795 + 66 * 16129,
                                            ("10.0.0.2:45027", "10.0.0.1:37441"): 4064175}  # no segs_out given
    assert parse_ss(SS_OUTPUT, [1]) == {}


def test_the_paced_rate_is_what_unpaced_traffic_leaves_of_the_cap():
    from swarmtrain.dht.uplink import MARGIN, UplinkMonitor, paced_rate

    cap = 1e6 / 8  # 1 Mbit/s
    assert paced_rate(cap, sent_per_s=100_000, paced_per_s=60_000) == pytest.approx(cap * (1 - MARGIN) - 40_000)
    assert paced_rate(cap, sent_per_s=10 * cap, paced_per_s=0) == pytest.approx(0.1 * cap)  # never stops pacing
    # the monitor: 50 kB/s leave unpaced (e.g. the DHT's records); the budget gets the rest of the cap
    budget = UploadBudget(1.0)
    readings = iter([0, 150_000, 300_000])
    monitor = UplinkMonitor(budget, read_ss=lambda: SS_OUTPUT.replace("4114795", str(next(readings)))
                            .replace("segs_out:16129", "segs_out:0"),
                            pids=lambda: [26049])
    monitor.baseline()
    for _ in range(2):
        budget.sent[BULK] += 100_000  # what we paced in that second
        rate = monitor.update(1.0)
    assert rate == pytest.approx(cap * (1 - MARGIN) - 50_000) and budget.rate == rate
