#!/usr/bin/env python
"""End-to-end effect of the expert pool on the demo: training samples/s of ``swarmtrain demo`` before and after.

"Before" is the code at git revision ``--before`` (default: the last commit before "Expert pool phase 2", when
remote experts were called with one stream per call, the server stepped a non-fused Adam and nothing of the later
expert-pool work existed); "after" is this working tree. Both run the same command,
``python -m swarmtrain.peer demo --peers P --duration D --json`` (a coordinator and P peer processes on 127.0.0.1,
the bundled data, each version with its own defaults), alternately (before, after, before, ...) so that drifting
machine load hits both alike. The old revision is checked out into a temporary ``git worktree`` and imported in
place of the installed package through a throwaway ``swarmtrain`` namespace folder on ``PYTHONPATH`` (whose
sub-packages link to the worktree), with the same virtual environment.

Per run: the swarm's training rate as the demo reports it at the end (``samples_per_s``: the sum over peers of
each peer's samples/s over its last heartbeat window, i.e. steady-state training, the headline), and total
samples / duration (which also counts start-up: joining, hosting experts, the first evaluation), and the
validation losses.
Medians over ``--repeats``. The LAST line printed is one JSON object
``{"before_sps": f, "after_sps": f, "speedup": f, "runs": {...}, "config": {...}}``.

Run: ``.venv/bin/python benchmarks/demo_throughput.py [--peers 3] [--duration 90] [--repeats 2]``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("peer", "dht", "expert_pool", "averaging", "dashboard")
DEFAULT_BEFORE = "0279959^"  # the parent of "Expert pool phase 2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' code")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of training per demo run")
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="demo-before-") as tmp:
        worktree, shim = Path(tmp) / "src", Path(tmp) / "pkg"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(worktree), args.before],
                       check=True, capture_output=True, text=True)
        try:
            (shim / "swarmtrain").mkdir(parents=True)
            for name in SUBPACKAGES:
                if (worktree / name).is_dir():
                    (shim / "swarmtrain" / name).symlink_to(worktree / name)
            check_imports(shim)
            for index in range(args.repeats):
                for version in ("before", "after"):
                    result = run_demo(args, shim if version == "before" else None, tmp)
                    result["samples_per_s_over_duration"] = result["samples"] / args.duration
                    runs[version].append(result)
                    print(f"{version} run {index}: {json.dumps(result)}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    summary = {}
    for version, results in runs.items():
        summary[f"{version}_sps"] = statistics.median(r["samples_per_s"] for r in results)
        summary[f"{version}_samples_over_duration_sps"] = statistics.median(
            r["samples_per_s_over_duration"] for r in results)
        summary[f"{version}_val_loss_end"] = statistics.median(r["val_loss_end"] for r in results)
    summary["speedup"] = summary["after_sps"] / summary["before_sps"] if summary["before_sps"] else None
    print(f"demo training samples/s (sum of {args.peers} peers, {args.duration:.0f} s runs): before "
          f"{summary['before_sps']:.1f} -> after {summary['after_sps']:.1f} "
          f"({summary['speedup'] or float('nan'):.2f}x); samples / duration: "
          f"{summary['before_samples_over_duration_sps']:.1f} -> {summary['after_samples_over_duration_sps']:.1f}",
          flush=True)
    print(json.dumps({**summary, "runs": runs, "config": {**vars(args), "python": sys.version.split()[0]}}))


def check_imports(shim: Path) -> None:
    """Fail unless the old code's main modules are imported from the worktree (a module missing there would
    otherwise be taken from the installed, new package)."""
    modules = [f"swarmtrain.{m}" for m in ("peer.daemon", "peer.model", "peer.trainer", "peer.demo", "dht.node",
                                          "expert_pool.client", "expert_pool.server", "averaging.gossip")]
    code = "import importlib, json; print(json.dumps([importlib.import_module(m).__file__ for m in %r]))" % modules
    env = dict(os.environ, PYTHONPATH=str(shim))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    stray = [f for f in files if not f.startswith(str(shim))]
    if stray:
        raise RuntimeError(f"the 'before' revision lacks modules, the new ones would be used: {stray}")


def run_demo(args, shim, tmp: str) -> dict:
    """One ``swarmtrain demo --json`` run; ``shim`` puts the old code first on the import path."""
    env = dict(os.environ)
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [env.get("PYTHONPATH")])])
    workdir = tempfile.mkdtemp(prefix="demo-", dir=tmp)
    command = [sys.executable, "-m", "swarmtrain.peer", "demo", "--peers", str(args.peers),
               "--duration", str(args.duration), "--json", "--workdir", workdir]
    proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=args.duration + 300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"demo failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if not result.get("peers"):
        raise RuntimeError(f"demo ran without training peers: {lines[-1]} (logs in {workdir})")
    return {key: result.get(key) for key in ("peers", "steps", "samples", "samples_per_s", "val_loss_start",
                                              "val_loss_end", "averaging_rounds", "experts")}


if __name__ == "__main__":
    main()
