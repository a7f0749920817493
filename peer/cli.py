"""The ``swarmtrain`` command: ``peer``, ``coordinator``, ``demo``, ``status`` and ``dashboard`` subcommands.

Bad flags, config files or environment variables end with a one-line error and exit code 2; failures at run
time (unreachable initial peers, no verified manifest, corrupt key files) end with a one-line error and exit 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional, Sequence

from swarmtrain.peer.config import (
    CoordinatorOptions,
    DashboardOptions,
    DemoOptions,
    PeerOptions,
    StatusOptions,
)
from swarmtrain.peer.options import OptionsError, add_options, build_options

logger = logging.getLogger("swarmtrain")

COMMANDS = {
    "peer": (PeerOptions, "run a volunteer peer: host experts, train, average"),
    "coordinator": (CoordinatorOptions, "seed a run: bootstrap node, signed manifest, checkpoints"),
    "demo": (DemoOptions, "run a local demo swarm (coordinator + N peers on 127.0.0.1) on bundled data"),
    "status": (StatusOptions, "print the manifest, peers and experts of a running swarm"),
    "dashboard": (DashboardOptions, "serve a read-only web dashboard of a running swarm"),
}


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (naming it) and exit code 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _OneLineErrors(prog="swarmtrain", description="Decentralized swarm training of a multimodal MoE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineErrors)
    for name, (cls, help_text) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_text, description=cls.__doc__), cls)
    args = parser.parse_args(argv)
    cls = COMMANDS[args.command][0]
    try:
        options = build_options(cls, args)
        options.check()
    except OptionsError as e:
        print(f"swarmtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(getattr(options, "log_level", "INFO"))
    runner: Callable = {"peer": run_peer, "coordinator": run_coordinator, "demo": run_demo,
                        "status": run_status, "dashboard": run_dashboard}[args.command]
    try:
        return runner(options)
    except OptionsError as e:
        print(f"swarmtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # startup failures: one clear line (the log above has details)
        from swarmtrain.dht.identity import IdentityError
        from swarmtrain.dht.node import BootstrapError
        from swarmtrain.peer.checkpoint import CheckpointError
        from swarmtrain.peer.daemon import ManifestError

        if isinstance(e, (BootstrapError, ManifestError, IdentityError, CheckpointError, ValueError)):
            logger.debug("details", exc_info=True)  # --log-level DEBUG shows where it came from
            print(f"swarmtrain {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        reap_children()


def run_peer(options: PeerOptions) -> int:
    from swarmtrain.peer.daemon import PeerDaemon

    stop = _stop_on_signals()
    PeerDaemon(options).run(stop)
    return 0


def run_coordinator(options: CoordinatorOptions) -> int:
    from swarmtrain.peer.coordinator import Coordinator

    stop = _stop_on_signals()
    coordinator = Coordinator(options)
    try:
        maddrs = coordinator.start()
        print(f"coordinator {coordinator.peer_id} of run {options.run_id!r} is up. Volunteers join with:", flush=True)
        for maddr in maddrs:
            print(f"  swarmtrain peer --run-id {options.run_id} --initial-peers {maddr}", flush=True)
        print("SWARMTRAIN_MADDRS " + " ".join(maddrs), flush=True)
        coordinator.run(stop)
    finally:
        coordinator.shutdown()
    return 0


def run_demo(options: DemoOptions) -> int:
    from swarmtrain.peer.demo import Demo

    result = Demo(options).run()
    if options.json:
        print(json.dumps(result), flush=True)
    return 0 if result.get("peers", 0) > 0 else 1


def run_status(options: StatusOptions) -> int:
    from swarmtrain.peer.status import read_status, render_status

    status = read_status(options)
    print(json.dumps(status) if options.json else render_status(status), flush=True)
    return 0


def run_dashboard(options: DashboardOptions) -> int:
    from swarmtrain.dashboard.server import DashboardServer
    from swarmtrain.peer.status import SwarmObserver

    stop = _stop_on_signals()
    observer = SwarmObserver(options.run_id, options.initial_peers, options.host_maddrs, options.coordinator)
    server = DashboardServer(observer.directory, options.run_id, host=options.host, port=options.port,
                             db_path=options.db, retention_s=options.retention_s)
    try:
        server.start()
        print(f"dashboard of run {options.run_id!r} at {server.url}", flush=True)
        stop.wait()
    finally:
        server.stop()
        observer.close()
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked helper (hivemind's DHT process)
            if signum == signal.SIGTERM:  # sent to it alone (e.g. by reap_children): die as usual
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # the terminal's Ctrl+C: the parent shuts it down in order
        if stop.is_set():  # a second Ctrl+C: give up waiting for a clean stop
            raise KeyboardInterrupt
        logger.info(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def reap_children(timeout: float = 5.0) -> None:
    """Terminate (then kill) any process this one started that is still alive, e.g. a p2pd daemon."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


if __name__ == "__main__":
    sys.exit(main())
