"""Checkpoints of the swarm's model: one safetensors file with the replicated parameters and every expert.

Tensor names are ``replicated/<parameter name>`` and ``experts/<uid>/<parameter name>``; the file's metadata holds
the run manifest (JSON) and when/what was saved. Files are written atomically (temporary file + rename), so a crash
mid-write never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swarmtrain.dht.records import Manifest

PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or belongs to another run/model."""


@dataclass
class Checkpoint:
    manifest: Manifest
    replicated: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]
    saved_at: float
    source_peers: list[str]


def save_checkpoint(directory: str, checkpoint: Checkpoint, keep: int = 3) -> str:
    """Write ``checkpoint`` into ``directory`` and delete all but the ``keep`` newest; returns the file path."""
    os.makedirs(directory, exist_ok=True)
    tensors = {f"replicated/{name}": t.detach().cpu().contiguous() for name, t in checkpoint.replicated.items()}
    for uid, state in checkpoint.experts.items():
        tensors.update({f"experts/{uid}/{name}": t.detach().cpu().contiguous() for name, t in state.items()})
    metadata = {
        "format": "swarmtrain-checkpoint-1",
        "manifest": checkpoint.manifest.model_dump_json(),
        "saved_at": repr(checkpoint.saved_at),
        "source_peers": json.dumps(checkpoint.source_peers),
    }
    path = os.path.join(directory, f"{PREFIX}{int(checkpoint.saved_at * 1000)}.safetensors")
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep]:
        os.remove(old)
    return path


def load_checkpoint(path: str, expect: Optional[Manifest] = None) -> Checkpoint:
    """Read and check a checkpoint; raise CheckpointError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a safetensors file: {e}") from None
    if metadata.get("format") != "swarmtrain-checkpoint-1":
        raise CheckpointError(f"checkpoint {path!r} is not a swarmtrain checkpoint (format {metadata.get('format')!r})")
    try:
        manifest = Manifest.model_validate_json(metadata["manifest"])
        saved_at = float(metadata["saved_at"])
        source_peers = json.loads(metadata.get("source_peers", "[]"))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} has a bad manifest/metadata: {e}") from None
    if not math.isfinite(saved_at):
        raise CheckpointError(f"checkpoint {path!r} has a non-finite save time {saved_at!r}")
    if expect is not None and (expect.model != manifest.model or expect.experts_per_layer != manifest.experts_per_layer):
        raise CheckpointError(f"checkpoint {path!r} was saved for a different model than this run's manifest")
    replicated, experts = {}, {}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path!r} holds non-finite values in {name}")
        kind, _, rest = name.partition("/")
        if kind == "replicated":
            replicated[rest] = tensor
        elif kind == "experts":
            uid, _, param = rest.partition("/")
            experts.setdefault(uid, {})[param] = tensor
        else:
            raise CheckpointError(f"checkpoint {path!r} has an unexpected tensor {name!r}")
    return Checkpoint(manifest, replicated, experts, saved_at, source_peers)


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.startswith(PREFIX) and n.endswith(".safetensors"))
    return [os.path.join(directory, n) for n in names]


