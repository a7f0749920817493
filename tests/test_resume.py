"""Resuming a run from a checkpoint (real processes on 127.0.0.1): the coordinator serves the checkpoint's state,
a volunteer of the resumed run starts from it, and bad --resume arguments end with one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
import torch

from swarmtrain.dht.identity import Identity
from swarmtrain.dht.node import SwarmNode
from swarmtrain.expert_pool.client import ExpertCallError, fetch_expert_state
from swarmtrain.expert_pool.dispatch import LocalDispatcher
from swarmtrain.expert_pool.expert import make_expert
from swarmtrain.peer.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from swarmtrain.peer.config import build_manifest
from swarmtrain.peer.data import DataSource
from swarmtrain.peer.model import SwarmModel
from swarmtrain.peer.seed import REPLICATED
from swarmtrain.peer.trainer import Trainer

from conftest import LOOPBACK, spawn, stop_group, swarmtrain_cmd, wait_for

pytestmark = pytest.mark.slow
RUN = "resumed"


def _model(manifest):
    experts = {uid: make_expert(uid, manifest.model.hidden, manifest.model.expert_ffn, manifest.seed)
               for uid in manifest.expert_uids()}
    return SwarmModel(manifest, LocalDispatcher(experts)), experts


def _val_loss(manifest, model, modalities=None) -> float:
    data = DataSource.builtin(manifest, list(modalities or manifest.modalities), shard_index=0, shard_count=1)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), threading.Lock(), None,
                      manifest.training.batch_size, seed=0, device=torch.device("cpu"))
    return trainer.evaluate()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint of a model trained for a few steps (so that its loss is far from a fresh model's)."""
    torch.manual_seed(0)
    manifest = build_manifest({"averaging": {"period_s": 3.0}}, RUN, "Qm" + "1" * 44)  # not all defaults
    model, experts = _model(manifest)
    fresh_loss = _val_loss(manifest, model)
    data = DataSource.builtin(manifest, list(manifest.modalities), shard_index=0, shard_count=1)
    params = list(model.parameters()) + [p for e in experts.values() for p in e.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = model.total_loss(model.losses(data.sample(16, generator)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained_loss = _val_loss(manifest, model)
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoint = Checkpoint(manifest, dict(model.named_parameters()),
                            {uid: e.state_dict() for uid, e in experts.items()}, 1234.5, [])
    path = save_checkpoint(str(directory), checkpoint)
    return {"path": path, "dir": str(directory), "manifest": manifest, "model": model, "experts": experts,
            "fresh_loss": fresh_loss, "trained_loss": trained_loss}


@pytest.mark.timeout(420)
def test_a_volunteer_of_a_resumed_run_starts_from_the_checkpoint(trained_checkpoint, tmp_path):
    ckpt = trained_checkpoint
    assert ckpt["trained_loss"] < ckpt["fresh_loss"] - 0.5, (ckpt["fresh_loss"], ckpt["trained_loss"])
    maddrs_file = tmp_path / "maddrs"
    config = tmp_path / "run.toml"  # a resumed run may change training settings, not the model
    config.write_text('[manifest.optimizer]\nname = "adam"\nlr = 0.001\n')
    coordinator = spawn(swarmtrain_cmd(
        "coordinator", "--run-id", RUN, "--host-maddrs", LOOPBACK, "--maddrs-file", str(maddrs_file),
        "--checkpoint-dir", ckpt["dir"], "--checkpoint-every-s", "4", "--keep-checkpoints", "50", "--resume", "latest",
        "--config", str(config)),
        str(tmp_path / "coordinator.log"))
    peer = client = None
    try:
        wait_for(lambda: maddrs_file.exists() and maddrs_file.read_text().strip(), 60, what="coordinator")
        maddr = maddrs_file.read_text().split()[0]
        coordinator_id = maddr.rsplit("/p2p/", 1)[1]

        # what the coordinator serves is exactly the checkpoint
        client = SwarmNode(RUN, Identity.load_or_create(None), host_maddrs=[LOOPBACK], initial_peers=[maddr],
                           trusted_coordinator=coordinator_id)
        replicated = client.loop.run(fetch_expert_state(client.p2p, coordinator_id, REPLICATED), timeout=60)
        expected = dict(ckpt["model"].named_parameters())
        assert set(replicated) == set(expected)
        assert all(torch.equal(replicated[name], expected[name].detach()) for name in expected)
        uid = ckpt["manifest"].expert_uids(("text",))[-1]
        state = client.loop.run(fetch_expert_state(client.p2p, coordinator_id, uid), timeout=60)
        assert all(torch.equal(state[k], v) for k, v in ckpt["experts"][uid].state_dict().items())
        with pytest.raises(ExpertCallError, match="the checkpoint has no state for 'text.9.9'"):
            client.loop.run(fetch_expert_state(client.p2p, coordinator_id, "text.9.9"), timeout=60)

        # a volunteer of the resumed run evaluates the checkpoint's model before its first step
        peer = spawn(swarmtrain_cmd(
            "peer", "--run-id", RUN, "--initial-peers", maddr, "--host-maddrs", LOOPBACK, "--public-name", "dana",
            "--threads", "1", "--max-experts", "16", "--data-shard", "0/1", "--modalities", "text"),
            str(tmp_path / "dana.log"))

        def initial_loss():
            result = subprocess.run(swarmtrain_cmd("status", "--run-id", RUN, "--initial-peers", maddr, "--json",
                                                   "--host-maddrs", LOOPBACK), capture_output=True, text=True,
                                    timeout=60)
            if result.returncode != 0:
                return None
            status = json.loads(result.stdout.strip().splitlines()[-1])
            loss = next((hb["val_loss_initial"] for hb in status["peers"].values() if hb["public_name"] == "dana"), None)
            return (loss, status["manifest"]) if loss is not None else None

        loss, manifest = wait_for(initial_loss, 240, interval=5, what="the resumed peer's first evaluation")
        # the [manifest] table changed the learning rate; everything else is the checkpoint's
        assert manifest["resumed_from"] == 1234.5 and manifest["optimizer"]["lr"] == 0.001
        assert manifest["averaging"]["period_s"] == 3.0 and manifest["model"] == ckpt["manifest"].model.model_dump()
        assert manifest["created_at"] == ckpt["manifest"].created_at and manifest["coordinator"] == coordinator_id
        log = (tmp_path / "dana.log").read_text(errors="replace")
        assert f"{REPLICATED}: started from the checkpoint" in log
        assert f"{uid}: started from the checkpoint" in log
        expected_loss = _val_loss(ckpt["manifest"], ckpt["model"], ["text"])
        assert loss == pytest.approx(expected_loss, rel=1e-3), (loss, expected_loss, ckpt["fresh_loss"])

        # the resumed run's own checkpoints keep the image experts (nobody hosts them) as the checkpoint had them
        original = os.path.basename(ckpt["path"])
        newer = wait_for(lambda: [p for p in list_checkpoints(ckpt["dir"]) if os.path.basename(p) != original], 90,
                         what="a checkpoint of the resumed run")
        saved = load_checkpoint(newer[-1])
        assert set(saved.experts) == set(ckpt["manifest"].expert_uids())
        for image_uid in ckpt["manifest"].expert_uids(("image",)):
            want = ckpt["experts"][image_uid].state_dict()
            assert all(torch.equal(saved.experts[image_uid][k], v) for k, v in want.items()), image_uid
        assert saved.manifest.resumed_from == 1234.5
        assert "resuming run 'resumed' from checkpoint" in (tmp_path / "coordinator.log").read_text(errors="replace")
        shown = subprocess.run(swarmtrain_cmd("status", "--run-id", RUN, "--initial-peers", maddr, "--host-maddrs",
                                              LOOPBACK), capture_output=True, text=True, timeout=60)
        assert "resumed from a checkpoint saved 1970-01-01 00:20:34 UTC" in shown.stdout, shown.stdout
    finally:
        if client is not None:
            client.shutdown()
        for process in (peer, coordinator):
            if process is not None:
                stop_group(process)



@pytest.mark.timeout(120)
def test_bad_resume_arguments_end_with_one_clear_line(trained_checkpoint, tmp_path):
    corrupt = tmp_path / "checkpoint-1.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    other_model = tmp_path / "other.toml"
    other_model.write_text('[manifest.experts_per_layer]\ntext = 2\nimage = 2\n')
    other_seed = tmp_path / "seed.toml"
    other_seed.write_text('[manifest]\nseed = 7\n')
    path = trained_checkpoint["path"]
    cases = [
        (["--resume", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--resume", path, "--run-id", RUN, "--config", str(other_model)], "table changes experts_per_layer"),
        (["--resume", path, "--run-id", RUN, "--config", str(other_seed)], "table changes seed"),
        (["--resume", str(corrupt)], "is corrupt or not a safetensors file"),
        (["--resume", "latest", "--checkpoint-dir", str(tmp_path / "empty")], "--resume latest: no checkpoint in"),
        (["--resume", trained_checkpoint["path"], "--run-id", "other-run"], "pass --run-id resumed"),
    ]
    for args, message in cases:
        result = subprocess.run(swarmtrain_cmd("coordinator", "--host-maddrs", LOOPBACK, *args),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("swarmtrain coordinator: error:") and message in last, (args, last)


@pytest.mark.timeout(60)
def test_a_checkpoint_with_a_non_finite_save_time_is_refused(trained_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from swarmtrain.peer.checkpoint import CheckpointError, load_checkpoint

    with safe_open(trained_checkpoint["path"], framework="pt") as f:
        metadata = dict(f.metadata())
    path = tmp_path / "checkpoint-1.safetensors"
    save_file(load_file(trained_checkpoint["path"]), str(path), metadata={**metadata, "saved_at": "nan"})
    with pytest.raises(CheckpointError, match="non-finite save time"):
        load_checkpoint(str(path))
