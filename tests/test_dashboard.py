"""The dashboard against a real small swarm: API, metrics, forged records, history, and a real headless chromium.

The swarm is real hivemind DHT nodes (each with its p2pd) on 127.0.0.1 in child processes: a coordinator that
publishes the signed manifest, two peers that publish signed heartbeats, expert and averaging records, and a rogue
that stores forged records. Each child reports every record it published over a pipe, so the test compares what
the dashboard shows with what was really published.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Optional

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboard_swarm import (
    ALICE_EXPERTS,
    BOB_EXPERTS,
    EVIL_NAME,
    LOOPBACK,
    RUN_ID,
    LenientValidator,
    Member,
    MemberSpec,
    process_tree,
    await_hello,
    start_member,
)
from swarmtrain.dashboard import DashboardServer
from swarmtrain.dashboard.history import HistoryStore, PeerPoint
from swarmtrain.dashboard.tracking import PeerBook
from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dht.identity import Identity
from swarmtrain.dht.keys import RecordKind, dht_key
from swarmtrain.dht.node import SwarmNode
from swarmtrain.dht.records import Heartbeat

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ---------------------------------------------------------------- helpers


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, data=b"x" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str) -> dict:
    status, _, body = http(url)
    assert status == 200, (url, status, body[:200])
    return json.loads(body)


def peer_row(state: dict, peer_id: str) -> Optional[dict]:
    return next((p for p in state["peers"] if p["peer_id"] == peer_id), None)


# ---------------------------------------------------------------- the swarm fixture


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    keys = tmp_path_factory.mktemp("swarm")
    ids = {name: Identity.load_or_create(str(keys / f"{name}.key")) for name in ("coord", "alice", "bob", "rogue")}
    members: list[Member] = []
    reader: Optional[SwarmNode] = None
    holder: dict = {}
    try:
        coordinator = await_hello(start_member(MemberSpec("coordinator", ids["coord"].path)))
        members.append(coordinator)
        initial = (coordinator.maddrs[0],)
        alice = start_member(MemberSpec("peer", ids["alice"].path, initial, name="alice", modalities=("text",),
                                        experts=ALICE_EXPERTS, samples_per_s=40.0))
        bob = start_member(MemberSpec("peer", ids["bob"].path, initial, name=EVIL_NAME, client_mode=True,
                                      relay_via=initial[0], modalities=("text", "image"), experts=BOB_EXPERTS,
                                      samples_per_s=25.0))
        rogue = start_member(MemberSpec("rogue", ids["rogue"].path, initial, impersonate=ids["alice"].peer_id))
        members += [alice, bob, rogue]
        identity = Identity.load_or_create(str(keys / "reader.key"))
        reader = SwarmNode(RUN_ID, identity, initial_peers=initial, client_mode=True, start_p2p=False,
                           host_maddrs=[LOOPBACK])
        for member in (alice, bob, rogue):
            await_hello(member)
        db_path = str(tmp_path_factory.mktemp("dashboard") / "history.sqlite")
        server = DashboardServer(SwarmDirectory(reader.dht, RUN_ID, identity.peer_id), RUN_ID, port=0,
                                 db_path=db_path, poll_s=1.0)
        server.start()
        holder.update(coordinator=coordinator, alice=alice, bob=bob, rogue=rogue, reader=reader, server=server,
                      db_path=db_path, identity=identity)
        yield holder
    finally:
        if "server" in holder:
            holder["server"].stop()
        trees = [(member, member.request_stop()) for member in members]  # all shut down at once
        if reader is not None:
            reader.shutdown()
        deadline = time.monotonic() + 20
        for member, tree in trees:
            member.reap(tree, deadline)


def wait_until_live(server: DashboardServer, swarm: dict, timeout: float = 40.0) -> dict:
    """The first state in which the manifest and both peers are visible and online."""

    def ready():
        state = get_json(server.url + "api/v1/state")
        rows = [peer_row(state, swarm[name].peer_id) for name in ("alice", "bob")]
        ok = state["manifest"] is not None and all(r is not None and r["state"] == "online" for r in rows)
        return state if ok else None

    return wait_for(ready, timeout, what="manifest and both peers online in /api/v1/state")


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(120)
def test_state_and_metrics_match_what_peers_published(swarm):
    server, alice, bob, coordinator = swarm["server"], swarm["alice"], swarm["bob"], swarm["coordinator"]
    assert server.url.startswith("http://127.0.0.1:")
    state = wait_until_live(server, swarm)
    assert state["schema"] == "swarmtrain.dashboard.state/1" and state["run_id"] == RUN_ID
    assert state["manifest"]["coordinator"] == coordinator.peer_id
    assert state["manifest"]["experts_per_layer"] == {"text": 2, "image": 2}
    assert state["manifest"]["resumed_from"] == pytest.approx(state["manifest"]["created_at"] - 3600.0)

    for member in (alice, bob):
        row = peer_row(state, member.peer_id)
        published = wait_for(lambda: member.heartbeat_at(row["heartbeat_time"]), 10, what="published heartbeat")
        for key in ("public_name", "device", "version", "modalities", "experts", "maddrs", "client_mode", "loss",
                    "val_loss", "samples_per_s", "steps", "samples", "averaging_rounds", "averaging_bytes"):
            assert row[key] == published[key], (member.spec.name, key, row[key], published[key])
        assert row["experts_served"] == sorted(member.spec.experts)
        assert row["averaging_groups"] == 1
        assert 0 <= row["heartbeat_age_s"] < 10
    assert peer_row(state, bob.peer_id)["public_name"] == EVIL_NAME  # kept verbatim: the page escapes it
    assert peer_row(state, alice.peer_id)["reachability"] == "direct"
    assert peer_row(state, bob.peer_id)["reachability"] == "relay"
    assert peer_row(state, coordinator.peer_id)["role"] == "coordinator"

    online = [p for p in state["peers"] if p["state"] == "online"]
    overview = state["overview"]
    assert overview["nodes_online"] == len(online) >= 3
    assert overview["peers_online"] == sum(p["role"] == "peer" for p in online) == 2
    assert overview["samples_per_s"] == pytest.approx(sum(p["samples_per_s"] for p in online))
    val = [p["val_loss"] for p in online if p["val_loss"] is not None]
    assert overview["val_loss"] == pytest.approx(sum(val) / len(val))
    assert overview["samples_total"] >= sum(p["samples"] for p in online)
    assert overview["peers_ready_to_average"] == 2

    experts = {e["uid"]: e for modality in state["experts"].values() for e in modality}
    assert set(experts) == {f"{m}.{layer}.{i}" for m in ("text", "image") for layer in range(2) for i in range(2)}
    assert experts["text.0.0"]["replicas"] == 2 and sorted(experts["text.0.0"]["hosts"]) == sorted(
        [alice.peer_id, bob.peer_id])
    assert experts["text.0.0"]["load"] == pytest.approx(10.0 + 10.0)
    assert experts["image.0.0"]["replicas"] == 1 and experts["text.1.0"]["replicas"] == 1
    hosted = set(ALICE_EXPERTS) | set(BOB_EXPERTS)
    assert {uid for uid, e in experts.items() if e["under_served"]} == set(experts) - hosted
    assert overview["experts_under_served"] == len(set(experts) - hosted)

    # /metrics against the state of the same poll (retry if a poll lands between the two reads)
    def consistent():
        before = get_json(server.url + "api/v1/state")
        status, headers, body = http(server.url + "metrics")
        after = get_json(server.url + "api/v1/state")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        return (before, body.decode()) if before["generated_at"] == after["generated_at"] else None

    state, text = wait_for(consistent, 20, interval=0.05, what="a /metrics scrape between two polls")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def metric(name, **labels):
        return samples[(name, tuple(sorted({"run_id": RUN_ID, **labels}.items())))]

    overview = state["overview"]
    assert metric("swarmtrain_peers", state="online") == overview["peers_online"]
    assert metric("swarmtrain_nodes_online") == overview["nodes_online"]
    assert metric("swarmtrain_samples_per_second") == pytest.approx(overview["samples_per_s"])
    assert metric("swarmtrain_val_loss") == pytest.approx(overview["val_loss"])
    assert metric("swarmtrain_averaging_rounds_total") == overview["averaging_rounds_total"]
    assert metric("swarmtrain_averaging_bytes_total") == overview["averaging_bytes_total"]
    for uid, expert in experts.items():
        assert metric("swarmtrain_expert_replicas", modality=uid.split(".")[0], uid=uid) == expert["replicas"]
    for member in (alice, bob):
        row = peer_row(state, member.peer_id)
        labels = {"peer_id": member.peer_id, "public_name": row["public_name"]}
        assert metric("swarmtrain_peer_samples_per_second", **labels) == pytest.approx(row["samples_per_s"])
        assert metric("swarmtrain_peer_loss", **labels) == pytest.approx(row["loss"])
        assert metric("swarmtrain_peer_heartbeat_age_seconds", **labels) == pytest.approx(row["heartbeat_age_s"])
        assert metric("swarmtrain_peer_averaging_rounds_total", **labels) == row["averaging_rounds"]


@pytest.mark.timeout(60)
def test_read_only_http_surface(swarm):
    url = swarm["server"].url
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        status, headers, _ = http(url + "api/v1/state", method=method)
        assert status == 405 and headers.get("Allow") == "GET", method
    assert http(url + "static/../server.py")[0] == 404
    assert http(url + "static/%2e%2e/server.py")[0] == 404
    assert http(url + "nope")[0] == 404
    assert http(url + "api/v1/history?window_s=abc")[0] == 400
    status, headers, body = http(url)
    assert status == 200 and b"swarmtrain" in body and "script-src 'self'" in headers["Content-Security-Policy"]


@pytest.mark.timeout(60)
def test_records_failing_validation_are_not_shown(swarm):
    server, alice, rogue, coordinator = swarm["server"], swarm["alice"], swarm["rogue"], swarm["coordinator"]
    # the forgeries really are in the DHT: a reader that validates nothing gets them from the rogue's storage
    import hivemind

    lenient = hivemind.DHT(initial_peers=[coordinator.maddrs[0]], host_maddrs=[LOOPBACK], client_mode=True,
                           record_validators=[LenientValidator(RUN_ID, None)], start=True)
    try:
        def forged_visible():
            manifests = lenient.get(dht_key(RUN_ID, RecordKind.MANIFEST), latest=True)
            heartbeats = lenient.get(dht_key(RUN_ID, RecordKind.PEERS), latest=True)
            return (manifests is not None and rogue.peer_id in manifests.value
                    and heartbeats is not None and rogue.peer_id in heartbeats.value)

        wait_for(forged_visible, 20, interval=0.5, what="the rogue's records in the DHT")
    finally:
        lenient.shutdown()

    state = wait_until_live(server, swarm)
    time.sleep(2 * server.collector.poll_s)  # a few more polls with the forgeries in the DHT
    state = get_json(server.url + "api/v1/state")
    assert state["manifest"]["coordinator"] == coordinator.peer_id  # not the rogue's (newer) manifest
    assert peer_row(state, rogue.peer_id) is None
    assert all(p["public_name"] != "mallory" for p in state["peers"])
    assert peer_row(state, alice.peer_id)["public_name"] == "alice"
    text11 = next(e for e in state["experts"]["text"] if e["uid"] == "text.1.1")
    assert text11["replicas"] == 0 and text11["under_served"]


@pytest.mark.timeout(60)
def test_history_survives_a_dashboard_restart(swarm):
    old = swarm["server"]
    wait_for(lambda: len(get_json(old.url + "api/v1/history?window_s=600")["swarm"]["t"]) >= 3, 20,
             what="three polls in the history")
    old.stop()
    restarted_at = time.time()
    server = DashboardServer(SwarmDirectory(swarm["reader"].dht, RUN_ID, swarm["identity"].peer_id), RUN_ID,
                             port=0, db_path=swarm["db_path"], poll_s=1.0)
    server.start()
    swarm["server"] = server
    history = get_json(server.url + "api/v1/history?window_s=600&max_points=1000")
    assert sum(t < restarted_at for t in history["swarm"]["t"]) >= 3
    assert any(p["public_name"] == "alice" and p["t"] for p in history["peers"])
    assert any(v is not None for v in history["swarm"]["samples_per_s"])


async def _forget_all_neighbours(dht, node) -> int:
    """Runs in the reader's DHT process: empty its routing table, as RPC timeouts on a busy machine can."""
    table = node.protocol.routing_table
    node_ids = list(table.uid_to_peer_id)
    for node_id in node_ids:
        del table[node_id]
    return len(node_ids)


@pytest.mark.timeout(60)
def test_dashboard_reconnects_when_its_node_loses_every_neighbour(swarm):
    server = swarm["server"]
    wait_until_live(server, swarm)
    assert swarm["reader"].dht.run_coroutine(_forget_all_neighbours) > 0
    wait_for(lambda: get_json(server.url + "api/v1/state")["dashboard"]["reconnects"] >= 1, 15,
             what="the collector to reconnect its DHT node")
    state = wait_until_live(server, swarm, timeout=10)
    assert state["dashboard"]["dht_neighbours"] > 0 and state["dashboard"]["last_error"] is None
    assert all(p["gone_since"] is None for p in state["peers"] if p["peer_id"] != swarm["rogue"].peer_id)


@pytest.mark.timeout(30)
def test_history_store_is_bounded(tmp_path):
    store = HistoryStore(str(tmp_path / "h.sqlite"), "r", retention_s=100.0, max_rows=50)
    now = time.time()
    for i in range(60):
        store.append(now - 60 + i, {"loss": float(i)}, [PeerPoint("p1", "one", {"loss": float(i)})])
    store.prune(now)
    assert store.row_count() <= 50
    store.append(now - 500, {"loss": 1.0}, [])  # older than the retention
    store.prune(now)
    with sqlite3.connect(str(tmp_path / "h.sqlite")) as db:
        assert db.execute("SELECT MIN(t) FROM swarm").fetchone()[0] >= now - 100
    result = store.query(window_s=100, max_points=10, now=now)
    assert 0 < len(result["swarm"]["t"]) <= 10 and result["peers"][0]["public_name"] == "one"
    store.close()


@pytest.mark.timeout(30)
def test_peer_book_keeps_counters_across_restarts_and_marks_gone():
    pid = "Qm" + "a" * 44
    book = PeerBook()
    hb = lambda **kw: Heartbeat(peer_id=pid, **kw)  # noqa: E731
    book.update({pid: (hb(samples=100, averaging_rounds=3, time=1.0), 10.0)}, now=1.0)
    book.update({pid: (hb(samples=160, averaging_rounds=4, time=2.0), 11.0)}, now=2.0)
    book.update({pid: (hb(samples=20, averaging_rounds=1, time=3.0), 12.0)}, now=3.0)  # the peer restarted
    assert book.totals()["samples"] == 180 and book.observed["samples"] == 80
    assert book.peers[pid].state(3.0, stale_after_s=4.0).value == "online"
    assert book.peers[pid].state(8.0, stale_after_s=4.0).value == "stale"
    book.update({}, now=9.0)  # missing from one read, but its record (expiring at 12) cannot be gone yet
    assert book.peers[pid].gone_since is None and book.peers[pid].state(9.0, stale_after_s=4.0).value == "stale"
    book.update({}, now=13.0)
    assert book.peers[pid].gone_since == 13.0 and book.peers[pid].state(13.0, stale_after_s=4.0).value == "gone"


# ---------------------------------------------------------------- the browser


def _chrome(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: run `make browser` "
                    "(scripts/install-browser.sh)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1440,2000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_browser_shows_live_peers_charts_and_a_killed_peer_as_gone(swarm, tmp_path):
    server, alice, bob = swarm["server"], swarm["alice"], swarm["bob"]
    wait_until_live(server, swarm)
    driver = _chrome(tmp_path)
    service_pid = driver.service.process.pid
    try:
        driver.get(server.url)

        def row_text(peer_id, css):
            return driver.execute_script(
                "const r = document.querySelector(`tr[data-peer-id='${arguments[0]}']`);"
                "return r ? r.querySelector(arguments[1]).textContent : null;", peer_id, css)

        wait_for(lambda: row_text(alice.peer_id, "td.name") == "alice", 20, what="alice's row in the page")
        wait_for(lambda: row_text(bob.peer_id, "td.name") == EVIL_NAME, 10, what="bob's row, escaped")
        assert driver.execute_script("return document.querySelectorAll('#peers-body img').length") == 0
        assert driver.title == "swarmtrain dashboard"
        summary = driver.find_element("id", "manifest-summary").text
        assert "resumed from" in summary and "checkpoint of" in summary, summary
        for peer in (alice, bob):
            assert row_text(peer.peer_id, ".badge.online") == "online"

        def chart_points():
            return driver.execute_script(
                "const c = Chart.getChart('chart-throughput');"
                "return c ? c.data.datasets[0].data.length : 0;")

        wait_for(lambda: chart_points() >= 2, 20, what="data points in the throughput chart")
        assert int(driver.find_element("id", "chart-peer-loss").get_attribute("data-points")) > 0
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("SWARMTRAIN_DASHBOARD_SCREENSHOT"):
            shutil.copy(shot, os.environ["SWARMTRAIN_DASHBOARD_SCREENSHOT"])

        killed_at = time.monotonic()
        alice.killprocess_tree()
        wait_for(lambda: driver.execute_script(
            "const r = document.querySelector(`tr[data-peer-id='${arguments[0]}']`);"
            "return r && r.dataset.state;", alice.peer_id) == "gone", 15, what="alice shown as gone")
        assert time.monotonic() - killed_at <= 15
        assert row_text(bob.peer_id, "td:nth-child(3)") == "online"

        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        browser_processes = process_tree(service_pid)
        driver.quit()
        for proc in browser_processes:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


# ---------------------------------------------------------------- the real roles


@pytest.mark.timeout(120)
def test_coordinator_serves_the_dashboard_of_a_real_training_peer(tmp_path):
    """``swarmtrain coordinator --dashboard-port`` + one real ``swarmtrain peer``: the page's API sees it train."""
    from conftest import spawn, stop_group, swarmtrain_cmd

    port = _free_port()
    maddrs_file = tmp_path / "maddrs"
    coordinator = spawn(swarmtrain_cmd(
        "coordinator", "--run-id", "dash-real", "--host-maddrs", LOOPBACK, "--maddrs-file", str(maddrs_file),
        "--identity", str(tmp_path / "coordinator.key"), "--checkpoint-every-s", "0", "--dashboard-port", str(port),
    ), str(tmp_path / "coordinator.log"))
    peer = None
    try:
        wait_for(lambda: maddrs_file.exists() and maddrs_file.read_text().strip(), 60, what="the coordinator's maddrs")
        maddr = maddrs_file.read_text().split()[0]
        peer = spawn(swarmtrain_cmd(
            "peer", "--run-id", "dash-real", "--initial-peers", maddr, "--host-maddrs", LOOPBACK,
            "--public-name", "real-peer", "--threads", "1",
        ), str(tmp_path / "peer.log"))
        url = f"http://127.0.0.1:{port}/"

        def training():
            try:
                state = get_json(url + "api/v1/state")
            except urllib.error.URLError:  # the coordinator writes its maddrs before its dashboard listens
                return None
            rows = [p for p in state["peers"] if p["public_name"] == "real-peer"]
            return state if rows and rows[0]["state"] == "online" and rows[0]["steps"] > 0 else None

        try:
            state = wait_for(training, 80, interval=1.0, what="the real peer training, seen by the dashboard")
        except AssertionError as e:
            logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in ("coordinator", "peer")}
            raise AssertionError(f"{e}\n--- coordinator log:\n{logs['coordinator']}\n--- peer log:\n{logs['peer']}")
        row = next(p for p in state["peers"] if p["public_name"] == "real-peer")
        assert state["manifest"]["coordinator"] == maddr.rsplit("/p2p/", 1)[1]
        assert state["manifest"]["resumed_from"] is None  # a fresh run
        assert any(p["role"] == "coordinator" for p in state["peers"])
        assert row["reachability"] == "direct" and row["samples"] > 0 and row["loss"] is not None
        served = {e["uid"]: e for m in state["experts"].values() for e in m}
        assert row["experts_served"] and all(served[uid]["replicas"] >= 1 for uid in row["experts_served"])
        text = http(url + "metrics")[2].decode()
        assert 'swarmtrain_peers{run_id="dash-real",state="online"} 1.0' in text
    finally:
        for process in (peer, coordinator):
            if process is not None:
                stop_group(process)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
