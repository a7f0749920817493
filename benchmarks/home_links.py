"""Home links: the demo swarm (coordinator + 4 peers, each on its own lab host) on open, capped, capped+RTT and
partitioned links, and hivemind 1.1.12 on the same open and capped links, in one run.

Scenarios (each trains for the same ``--window`` seconds once every peer has stepped, after ``--warmup``):

* ``open``: the lab's kernel bridge, no cap;
* ``capped``: every host's egress and ingress capped at ``--mbps`` (tc tbf, burst 64 kB, 400 ms of queue: a home
  router's deep buffer); the peers declare it with ``--max-upload-mbps`` as a volunteer should;
* ``capped_rtt``: the same plus ``--rtt-ms`` of round trip through the lab's userspace delay line;
* ``partition``: open links, the last peer's link taken down (a black hole) for ``--cut-s`` seconds mid-window;
* ``capped_unrouted``: ``capped`` without communication-aware routing (``expert_pool.comm_cost_weight = 0``);
* ``upload_cap``: open links, every peer declares ``--max-upload-mbps`` = ``--cap-mbps`` and routes without
  communication cost (so that its expert calls alone would exceed the cap); the lab's interface counters give the
  largest upload over any 10 s window;
* ``hivemind_open`` / ``hivemind_capped``: 4 ``hivemind.Optimizer`` data-parallel peers on the demo model
  (``benchmarks/_hivemind_peer.py``, blockwise 8-bit gradients and state), no swarmtrain code on the wire.

Per-peer training samples/s come from each peer's ``--progress-file`` (one line per step); ``*_ratio`` is against
``open``; ``survivor_ratio`` / ``cut_host_ratio``: samples/s during the cut against before it; ``max_stall_s``:
the longest gap between two steps of any survivor in the window; ``rejoin_s``: from the link coming back to the
cut peer's next completed averaging exchange; ``*_val``: median of the peers' last validation loss at the end of
the window. Medians over ``--repeats``. The LAST line printed is one JSON object.

Needs root (network namespaces), iproute2 and gcc. Run::

    .venv/bin/python benchmarks/home_links.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import netlab  # noqa: E402
from _children import median  # noqa: E402

PEERS = 4
SCENARIOS = ("open", "capped", "capped_rtt", "partition", "upload_cap", "capped_unrouted", "hivemind_open",
             "hivemind_capped")
# manifest changes of the comparison scenarios (the coordinator's [manifest] table)
UNROUTED = {"expert_pool": {"comm_cost_weight": 0.0}}
MANIFESTS = {"capped_unrouted": UNROUTED, "upload_cap": UNROUTED}  # upload_cap: remote calls, so demand > cap
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hivemind-repeats", type=int, default=1, help="repeats of the hivemind scenarios")
    parser.add_argument("--window", type=float, default=75.0, help="seconds measured per scenario")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after every peer's first step")
    parser.add_argument("--mbps", type=float, default=20.0, help="link cap of the capped scenarios, each way")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--cut-s", type=float, default=25.0)
    parser.add_argument("--cap-mbps", type=float, default=4.0, help="--max-upload-mbps of the upload_cap scenario")
    parser.add_argument("--hivemind-target", type=int, default=4096, help="hivemind target_batch_size")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--workdir", default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    missing = netlab.missing_requirements(delay_line=True)
    if missing:
        raise SystemExit(f"home_links needs {', '.join(missing)}")
    netlab.cleanup_stale()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="home-links-"))
    runs: dict[str, list[dict]] = {name: [] for name in args.scenarios}
    started = time.time()
    for repeat in range(args.repeats):
        for name in args.scenarios:
            if name.startswith("hivemind") and repeat >= args.hivemind_repeats:
                continue
            folder = workdir / f"{name}-{repeat}"
            folder.mkdir(parents=True, exist_ok=True)
            result = run_hivemind(name, args, folder) if name.startswith("hivemind") else run_ours(name, args, folder)
            runs[name].append(result)
            print(f"[{time.time() - started:6.0f}s] {name} #{repeat}: {json.dumps(result)}", flush=True)
    summary = summarize(runs, args)
    print_table(summary)
    print(json.dumps(summary))


# ---- one scenario --------------------------------------------------------------------------------------------


def run_ours(name: str, args, folder: Path) -> dict:
    capped = name in ("capped", "capped_rtt", "capped_unrouted")
    rtt = args.rtt_ms if name == "capped_rtt" else 0.0
    with netlab.Lab(PEERS + 1, rtt_ms=rtt) as lab:
        if capped:
            for i in range(PEERS + 1):
                lab.cap(i, args.mbps, args.mbps)
        maddrs_file = folder / "maddrs"
        cmd = [sys.executable, "-m", "swarmtrain.peer"]
        config = folder / "run.toml"
        config.write_text(_toml_manifest(MANIFESTS.get(name, {})))
        lab.spawn(0, cmd + ["coordinator", "--run-id", "home", "--identity", str(folder / "coord.key"),
                            "--maddrs-file", str(maddrs_file), "--checkpoint-every-s", "0", "--config", str(config)],
                  folder / "coordinator.log", env=ENV)
        maddr = _wait_maddr(maddrs_file, lab.host(0).ip)
        progress = [folder / f"peer{i}.jsonl" for i in range(1, PEERS + 1)]
        budget = args.cap_mbps if name == "upload_cap" else args.mbps if capped else None
        for i, path in enumerate(progress, start=1):
            extra = ["--max-upload-mbps", str(budget)] if budget else []
            lab.spawn(i, cmd + ["peer", "--run-id", "home", "--initial-peers", maddr, "--threads", "1",
                                "--public-name", f"peer{i}", "--progress-file", str(path), *extra],
                      folder / f"peer{i}.log", env=ENV)
        _wait(lambda: all(_lines(p) for p in progress), 240, "every peer's first step")
        meters = [netlab.UploadMeter(lab, i) for i in range(1, PEERS + 1)]
        time.sleep(args.warmup)
        for meter in meters:
            meter.start()
        t0 = time.time()
        cut = None
        if name == "partition":
            time.sleep(args.window * 0.3)
            cut_start = time.time()
            lab.link_down(PEERS)
            time.sleep(args.cut_s)
            lab.link_up(PEERS)
            cut = (cut_start, time.time())
        time.sleep(max(0.0, t0 + args.window - time.time()))
        t1 = time.time()
        for meter in meters:
            meter.stop()
        uploads = [meter.max_rate_mbps(window_s=10.0) for meter in meters]
        means = [meter.mean_rate_mbps() for meter in meters]
    return measure([_lines(p) for p in progress], t0, t1, cut, uploads, means)


def run_hivemind(name: str, args, folder: Path) -> dict:
    with netlab.Lab(PEERS) as lab:
        if name == "hivemind_capped":
            for i in range(PEERS):
                lab.cap(i, args.mbps, args.mbps)
        logs = [folder / f"hm{i}.jsonl" for i in range(PEERS)]
        duration = args.window + args.warmup + 60
        script = str(ROOT / "benchmarks" / "_hivemind_peer.py")
        for i in range(PEERS):
            join = ["--initial-peers-file", str(folder / "maddrs0")] if i else []
            lab.spawn(i, [sys.executable, script, "--host-ip", lab.host(i).ip, *join,
                          "--maddrs-file", str(folder / f"maddrs{i}"), "--log-json", str(logs[i]),
                          "--duration", str(duration), "--target-batch-size", str(args.hivemind_target),
                          "--compression", "blockwise8", "--seed", str(i), "--shards", str(PEERS)],
                      folder / f"hm{i}.log", env=ENV)
        _wait(lambda: all(any(line.get("samples") for line in _lines(p)) for p in logs), 240,
              "every hivemind peer's first step")
        time.sleep(args.warmup)
        t0 = time.time()
        time.sleep(args.window)
        t1 = time.time()
        for proc in lab._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _wait(lambda: all(proc.poll() is not None for proc in lab._procs), 30, "hivemind peers to stop", fail=False)
    series = [[line for line in _lines(p) if "samples" in line] for p in logs]
    result = measure(series, t0, t1, None, [], [])
    finals = [line for p in logs for line in _lines(p) if line.get("final")]
    result["val"] = median([f.get("val_loss") for f in finals])
    result["epochs"] = median([max((line.get("global_epoch") or 0 for line in s), default=0) for s in series])
    return result


# ---- measurements --------------------------------------------------------------------------------------------


def measure(series: list[list[dict]], t0: float, t1: float, cut: Optional[tuple[float, float]],
            uploads: list[float], means: list[float]) -> dict:
    """Per-peer rates in [t0, t1], and for a cut (of the last peer) the rates and stalls around it."""
    rates = [_rate(s, t0, t1) for s in series]
    result = {"sps": median(rates), "sps_per_peer": rates,
              "val": median([_last(s, t1, "val_loss") for s in series]),
              "averaging_rounds": median([_delta(s, t0, t1, "averaging_rounds") for s in series]),
              "remote_share": median([_share(s, t0, t1) for s in series]),
              "upload_max10s_mbps": max(uploads) if uploads else None,
              "upload_mean_mbps": median(means) if means else None}
    if cut is not None:
        cut_start, cut_end = cut
        survivors, cut_host = series[:-1], series[-1]
        before = [_rate(s, t0, cut_start) for s in series]
        during = [_rate(s, cut_start, cut_end) for s in series]
        result["survivor_ratio"] = median([d / b for d, b in zip(during[:-1], before[:-1]) if b])
        result["cut_host_ratio"] = during[-1] / before[-1] if before[-1] else 0.0
        result["max_stall_s"] = max(_max_gap(s, t0, t1) for s in survivors)
        result["cut_host_stall_s"] = _max_gap(cut_host, t0, t1)
        rounds_at_end = _last(cut_host, cut_end, "averaging_rounds") or 0
        rejoined = [line["t"] for line in cut_host if line["t"] > cut_end and line["averaging_rounds"] > rounds_at_end]
        result["rejoin_s"] = (rejoined[0] - cut_end) if rejoined else None
    return result


def summarize(runs: dict, args) -> dict:
    def pick(name: str, key: str):
        return median([r.get(key) for r in runs.get(name, [])])

    open_sps = pick("open", "sps")
    out = {"open_sps": open_sps, "capped_sps": pick("capped", "sps"), "capped_rtt_sps": pick("capped_rtt", "sps"),
           "open_val": pick("open", "val"), "capped_val": pick("capped", "val"),
           "capped_rtt_val": pick("capped_rtt", "val")}
    out["capped_ratio"] = _ratio(out["capped_sps"], open_sps)
    out["capped_rtt_ratio"] = _ratio(out["capped_rtt_sps"], open_sps)
    out["partition"] = {key: pick("partition", key) for key in
                        ("survivor_ratio", "cut_host_ratio", "rejoin_s", "max_stall_s", "cut_host_stall_s", "sps")}
    out["hivemind"] = {"open_sps": pick("hivemind_open", "sps"), "capped_sps": pick("hivemind_capped", "sps"),
                       "open_val": pick("hivemind_open", "val"), "capped_val": pick("hivemind_capped", "val")}
    out["hivemind"]["capped_ratio"] = _ratio(out["hivemind"]["capped_sps"], out["hivemind"]["open_sps"])
    out["upload_cap"] = {"asked_mbps": args.cap_mbps, "measured_mbps": pick("upload_cap", "upload_max10s_mbps")}
    out["capped_upload_mbps"] = pick("capped", "upload_max10s_mbps")
    out["remote_share"] = {name: pick(name, "remote_share")
                           for name in ("open", "capped", "capped_rtt", "capped_unrouted")}
    out["capped_unrouted"] = {"sps": pick("capped_unrouted", "sps"), "val": pick("capped_unrouted", "val"),
                              "ratio": _ratio(pick("capped_unrouted", "sps"), open_sps),
                              "upload_mean_mbps": pick("capped_unrouted", "upload_mean_mbps")}
    out["capped_upload_mean_mbps"] = pick("capped", "upload_mean_mbps")
    out["config"] = {"peers": PEERS, "window_s": args.window, "mbps": args.mbps, "rtt_ms": args.rtt_ms,
                     "cut_s": args.cut_s, "repeats": args.repeats, "hivemind_repeats": args.hivemind_repeats,
                     "hivemind_target_batch_size": args.hivemind_target, "date": time.strftime("%Y-%m-%d")}
    out["runs"] = runs
    return out


def print_table(s: dict) -> None:
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    print(f"per-peer samples/s: open {fmt(s['open_sps'], '.1f')}, capped {fmt(s['capped_sps'], '.1f')} "
          f"({fmt(s['capped_ratio'])}x), capped+rtt {fmt(s['capped_rtt_sps'], '.1f')} ({fmt(s['capped_rtt_ratio'])}x)")
    print(f"val loss at the end: open {fmt(s['open_val'], '.3f')}, capped {fmt(s['capped_val'], '.3f')}")
    p = s["partition"]
    print(f"partition: survivors {fmt(p['survivor_ratio'])}x, cut host {fmt(p['cut_host_ratio'])}x, "
          f"max stall {fmt(p['max_stall_s'])} s, rejoin {fmt(p['rejoin_s'])} s")
    h = s["hivemind"]
    print(f"hivemind: open {fmt(h['open_sps'], '.1f')}, capped {fmt(h['capped_sps'], '.1f')} "
          f"({fmt(h['capped_ratio'])}x) samples/s per peer")
    u = s["capped_unrouted"]
    print(f"capped without communication-aware routing: {fmt(u['sps'], '.1f')} samples/s ({fmt(u['ratio'])}x), "
          f"val {fmt(u['val'], '.3f')}, upload {fmt(u['upload_mean_mbps'])} Mbit/s (routed: "
          f"{fmt(s['capped_upload_mean_mbps'])}); remote share of calls {s['remote_share']}")
    print(f"upload cap asked {s['upload_cap']['asked_mbps']} Mbit/s, max over 10 s {fmt(s['upload_cap']['measured_mbps'])}")


def _toml_manifest(table: dict) -> str:
    """A coordinator config holding ``[manifest.<section>]`` tables of scalar values."""
    lines = ["[manifest]"]
    for section, values in table.items():
        lines.append(f"[manifest.{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _rate(series: list[dict], a: float, b: float) -> float:
    return (_at(series, b, "samples") - _at(series, a, "samples")) / max(b - a, 1e-9)


def _delta(series: list[dict], a: float, b: float, key: str) -> float:
    return _at(series, b, key) - _at(series, a, key)


def _share(series: list[dict], a: float, b: float) -> Optional[float]:
    calls = _delta(series, a, b, "forward_calls")
    return _delta(series, a, b, "remote_forward_calls") / calls if calls else None


def _at(series: list[dict], t: float, key: str) -> float:
    """The counter ``key`` as of time ``t`` (the last line at or before it)."""
    value = 0.0
    for line in series:
        if line["t"] > t:
            break
        value = line.get(key) or 0.0
    return value


def _last(series: list[dict], t: float, key: str):
    values = [line.get(key) for line in series if line["t"] <= t and line.get(key) is not None]
    return values[-1] if values else None


def _max_gap(series: list[dict], a: float, b: float) -> float:
    times = [a] + [line["t"] for line in series if a < line["t"] < b] + [b]
    return max(y - x for x, y in zip(times, times[1:]))


def _ratio(x, y):
    return x / y if x is not None and y else None


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _wait_maddr(path: Path, ip: str) -> str:
    def found():
        text = path.read_text() if path.exists() else ""
        return next((m for m in text.split() if f"/ip4/{ip}/" in m), None)

    return _wait(found, 90, "the coordinator's multiaddr on the lab link")


def _wait(predicate, timeout: float, what: str, fail: bool = True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    if fail:
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
    return None


if __name__ == "__main__":
    os.environ.update(ENV)
    main()
