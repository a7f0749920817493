"""The one-command demo: real coordinator and peer processes, Ctrl+C, the JSON result, nothing left behind."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from conftest import swarmtrain_cmd, wait_for

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in part for part in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"])[:200])
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(240)
def test_demo_trains_reports_json_and_ctrl_c_leaves_no_process(tmp_path):
    workdir = tmp_path / "demo"
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        demo = subprocess.Popen(swarmtrain_cmd("demo", "--peers", "2", "--duration", "0", "--json", "--workdir",
                                               str(workdir)), stdout=out, stderr=subprocess.STDOUT, text=True)

    def training():
        lines = [l for l in out_path.read_text().splitlines() if " peers 2 |" in l and "val " in l]
        if not lines:
            return False
        steps = int(lines[-1].split("steps ")[1].split(" ")[0])
        return steps >= 100 and "averaging rounds 0" not in lines[-1]

    try:
        wait_for(training, 180, interval=2, what="2 demo peers training and averaging")
        output = out_path.read_text()
        assert "swarmtrain peer --run-id demo --initial-peers /ip4/127.0.0.1/tcp/" in output  # how to join by hand
        demo.send_signal(signal.SIGINT)  # what Ctrl+C in a terminal does
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    assert result["peers"] == 2
    assert result["experts"] == {"image": 8, "text": 8}
    assert result["steps"] >= 100 and result["samples"] > result["steps"]
    assert result["averaging_rounds"] > 0
    assert result["val_loss_end"] < result["val_loss_start"]
    assert result["wall_s"] > 0
    time.sleep(1)
    assert not _processes_mentioning(str(workdir)), "processes of the demo survived Ctrl+C"
