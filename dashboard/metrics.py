"""``GET /metrics``: the dashboard state as Prometheus text, through prometheus-client.

A custom collector turns the latest state into metric families at scrape time, registered in a registry of its
own (never the process-global one), so several dashboards in one process do not clash and peers that left do not
leave stale label sets behind. Metric names are listed in dashboard/API.md.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "swarmtrain"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StateMetrics(Collector):
    """Prometheus metric families computed from ``get_state()`` (the ``/api/v1/state`` dict) at each scrape."""

    def __init__(self, get_state: Callable[[], dict]):
        self.get_state = get_state

    def collect(self) -> Iterator[Metric]:
        state = self.get_state()
        overview, run = state["overview"], {"run_id": state["run_id"]}
        labels = list(run)
        manifest = state["manifest"]
        info = InfoMetricFamily(f"{PREFIX}_run", "The run this dashboard watches", labels=labels)
        info.add_metric(list(run.values()), {
            "coordinator": manifest["coordinator"] if manifest else "",
            "modalities": ",".join(manifest["modalities"]) if manifest else "",
        })
        yield info

        peers = GaugeMetricFamily(f"{PREFIX}_peers", "Known volunteer peers (role peer) by state",
                                  labels=labels + ["state"])
        for name in ("online", "stale", "gone"):
            count = sum(p["state"] == name and p["role"] == "peer" for p in state["peers"])
            peers.add_metric([state["run_id"], name], count)
        yield peers
        yield _gauge("nodes_online", "Online nodes of any role (peers, coordinator, observers)", run,
                     overview["nodes_online"])

        yield _gauge("samples_per_second", "Samples per second summed over online peers", run,
                     overview["samples_per_s"])
        yield _gauge("loss", "Mean training loss of online peers", run, overview["loss"])
        yield _gauge("val_loss", "Mean validation loss of online peers", run, overview["val_loss"])
        yield _counter("samples", "Samples processed by all peers seen", run, overview["samples_total"])
        yield _counter("averaging_rounds", "Averaging rounds completed, summed over peers seen", run,
                       overview["averaging_rounds_total"])
        yield _counter("averaging_bytes", "Bytes sent and received by averaging, summed over peers seen", run,
                       overview["averaging_bytes_total"])
        yield _gauge("averaging_rounds_per_minute", "Averaging rounds per minute over the last minute", run,
                     overview["averaging_rounds_per_min"])
        yield _gauge("experts_under_served", "Experts of the manifest with no live replica", run,
                     overview["experts_under_served"])

        yield from _peer_families(state)
        yield from _expert_families(state)


def make_registry(get_state: Callable[[], dict]) -> CollectorRegistry:
    """A fresh registry holding only the dashboard's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateMetrics(get_state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)


def _peer_families(state: dict) -> Iterator[Metric]:
    labels = ["run_id", "peer_id", "public_name"]
    families = {
        "heartbeat_age_seconds": GaugeMetricFamily(
            f"{PREFIX}_peer_heartbeat_age_seconds", "Seconds since the peer's current heartbeat", labels=labels),
        "samples_per_s": GaugeMetricFamily(
            f"{PREFIX}_peer_samples_per_second", "Samples per second reported by the peer", labels=labels),
        "loss": GaugeMetricFamily(f"{PREFIX}_peer_loss", "Training loss reported by the peer", labels=labels),
        "val_loss": GaugeMetricFamily(f"{PREFIX}_peer_val_loss", "Validation loss reported by the peer",
                                      labels=labels),
        "averaging_rounds": CounterMetricFamily(
            f"{PREFIX}_peer_averaging_rounds", "Averaging rounds the peer completed", labels=labels),
        "averaging_bytes": CounterMetricFamily(
            f"{PREFIX}_peer_averaging_bytes", "Bytes the peer moved by averaging", labels=labels),
        "online": GaugeMetricFamily(f"{PREFIX}_peer_online", "1 if the peer is online, else 0", labels=labels),
    }
    for peer in state["peers"]:
        if peer["state"] == "gone":
            continue  # a gone peer's last numbers are history, not current values
        values = [state["run_id"], peer["peer_id"], peer["public_name"]]
        for key, family in families.items():
            value = peer["heartbeat_age_s"] if key == "heartbeat_age_seconds" else (
                float(peer["state"] == "online") if key == "online" else peer[key])
            if value is not None:
                family.add_metric(values, value)
    yield from families.values()


def _expert_families(state: dict) -> Iterator[Metric]:
    labels = ["run_id", "modality", "uid"]
    replicas = GaugeMetricFamily(f"{PREFIX}_expert_replicas", "Live replicas of each expert", labels=labels)
    load = GaugeMetricFamily(f"{PREFIX}_expert_load", "Rows per second served by an expert, summed over replicas",
                             labels=labels)
    for modality, experts in state["experts"].items():
        for expert in experts:
            values = [state["run_id"], modality, expert["uid"]]
            replicas.add_metric(values, expert["replicas"])
            load.add_metric(values, expert["load"])
    yield replicas
    yield load


def _gauge(name: str, doc: str, labels: dict[str, str], value: Optional[float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, labels: dict[str, str], value: Optional[float]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family
