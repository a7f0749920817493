"""The small interface a peer uses to keep its replicated parameters in agreement with the swarm.

The trainer owns the parameters and updates them in place under a lock; an averager runs beside it (its own
clock, its own threads) and nudges those parameters toward the other peers' values. The trainer only ever calls
the five methods of :class:`ParameterAverager`; nothing here knows how averaging is done (see
:mod:`swarmtrain.averaging.gossip` for the implementation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class AveragingStats:
    """What an averager has done so far (a snapshot; counters only grow).

    :param rounds: exchanges completed and applied, as initiator or as responder
    :param failures: exchanges that failed (timeout, lost partner, protocol error, rejected tensors)
    :param bytes_sent / bytes_received: payload bytes of averaging messages (exchanges and state transfers)
    :param last_partner: peer id of the partner of the last completed exchange
    :param last_round_s: wall time of the last completed exchange this peer initiated
    :param served: of ``rounds``, those where a partner initiated
    :param busy: exchanges skipped because the chosen partner was busy with another one (or still agreed with
        us since our last exchange, so that averaging again would change nothing)
    :param rejected: exchanges refused because the partner's tensors were bad (NaN/Inf, wrong sizes, outliers)
    :param stale_dropped: exchanges whose result was dropped because local training moved on too far meanwhile
    :param relative: of ``rounds``, those whose 8-bit values travelled as differences from a reference vector
        shared with the partner (``averaging.reference_partners``)
    """

    rounds: int
    failures: int
    bytes_sent: int
    bytes_received: int
    last_partner: Optional[str]
    last_round_s: Optional[float]
    served: int = 0
    busy: int = 0
    rejected: int = 0
    stale_dropped: int = 0
    relative: int = 0


@runtime_checkable
class ParameterAverager(Protocol):
    """What the peer's trainer needs from an averager.

    Example::

        averager = GossipAverager(node, directory, list(model.parameters()), lock, manifest.averaging)
        averager.load_state_from_peers()     # a late joiner starts from the swarm's current parameters
        averager.start()
        for step in itertools.count():
            with lock:
                optimizer.step()
            averager.on_local_step(step, samples=batch_size)
        averager.shutdown()
    """

    def start(self) -> None:
        """Begin averaging in the background (returns immediately)."""

    def on_local_step(self, local_step: int, samples: int) -> None:
        """Tell the averager the trainer finished optimizer step ``local_step`` with ``samples`` new samples.

        Cheap and non-blocking: safe to call after every step from the training thread.
        """

    def stats(self) -> AveragingStats:
        """Counters of what the averager has done so far."""

    def load_state_from_peers(self, timeout_s: float = 30) -> bool:
        """Copy the current parameters of a live peer into ours; False if no peer could provide them in time."""

    def load_parameters(self, values: Sequence[torch.Tensor]) -> None:
        """Overwrite our parameters with ``values`` (e.g. a checkpoint's), in the order they were given to us."""

    def shutdown(self) -> None:
        """Stop averaging and unregister from the swarm; idempotent."""
