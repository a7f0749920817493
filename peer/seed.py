"""Resuming a run from a checkpoint: the coordinator serves the checkpoint's state to the first volunteers.

A coordinator started with ``--resume`` keeps the checkpoint in memory (:class:`CheckpointSeed`) and answers state
requests on the same handle and wire format as a host's ``ExpertServer.rpc_state``, so volunteers fetch it with
:func:`~swarmtrain.expert_pool.client.fetch_expert_state`: ``uid`` is an expert uid, or :data:`REPLICATED` for
the parameters every peer keeps (everything but the experts). The signed manifest says the run was resumed
(``resumed_from``); only then does a volunteer ask, and only for state that no live peer has: the first volunteers
of a resumed run start from the checkpoint, later ones copy the swarm's newer state from them as usual.
A coordinator that did not resume refuses such requests, saying so.
"""
from __future__ import annotations

import logging
from typing import AsyncIterator, Mapping, Optional

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarmtrain.dht.streams import linger
from swarmtrain.expert_pool.codec import WireError, encode_tensor
from swarmtrain.expert_pool.server import DRAIN_TIMEOUT_S, ExpertServer
from swarmtrain.expert_pool.wire import DEFAULT_CHUNK_BYTES, error_response, pack_response, read_call
from swarmtrain.peer.checkpoint import Checkpoint

logger = logging.getLogger(__name__)
REPLICATED = "replicated"  # the uid under which the seed serves the replicated (non-expert) parameters


class CheckpointSeed:
    """Serves the state held in ``checkpoint`` (None: refuses every request) on ``ExpertServer``'s state handle."""

    def __init__(self, checkpoint: Optional[Checkpoint], chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.checkpoint, self.chunk_bytes = checkpoint, chunk_bytes
        self._packed: dict[str, list[runtime_pb2.ExpertResponse]] = {}  # the checkpoint never changes: encode once

    async def add_handler(self, p2p: P2P) -> None:
        """Register the handler on the coordinator's p2p (which hosts no ExpertServer of its own)."""
        await p2p.add_protobuf_handler(
            ExpertServer._get_handle_name(None, "rpc_state"), self.rpc_state, runtime_pb2.ExpertRequest,
            stream_input=True, stream_output=True,
        )

    async def rpc_state(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            call = await read_call(requests, max_bytes=0)
            messages = self._packed.get(call.uid)
            if messages is None:
                state = self._state(call.uid)
                names = sorted(state)
                messages = pack_response({"names": names}, [encode_tensor(state[n]) for n in names], self.chunk_bytes)
                self._packed[call.uid] = messages
            logger.info(f"sent the checkpoint's {call.uid} to {context.remote_id}")
        except WireError as e:
            messages = error_response(str(e))
        for message in messages:
            yield message
        await linger(requests, DRAIN_TIMEOUT_S)

    def _state(self, uid: str) -> Mapping[str, torch.Tensor]:
        if self.checkpoint is None:
            raise WireError("this coordinator did not resume the run from a checkpoint")
        state = self.checkpoint.replicated if uid == REPLICATED else self.checkpoint.experts.get(uid)
        if not state:
            raise WireError(f"the checkpoint has no state for {uid!r}")
        return state
