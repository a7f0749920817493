"""Keeping replicated parameters in agreement between peers, by pairwise gossip over the swarm's p2p network.

The peer's trainer sees only :class:`~swarmtrain.averaging.base.ParameterAverager`; the implementation is
:class:`~swarmtrain.averaging.gossip.GossipAverager`. Modules, from the top:

* ``base``: the interface and :class:`~swarmtrain.averaging.base.AveragingStats`;
* ``gossip``: the averager: its clock, partner choice, penalties, the ``rpc_exchange``/``rpc_state`` handlers;
* ``exchange``: the message flows of one exchange (both sides) and of a state transfer;
* ``replica``: the local side of the arithmetic: parameters under the trainer's lock, codecs, error feedback;
* ``rules``: the update rule itself (push-sum mixing, staleness, clipping, DiLoCo's outer step), pure functions;
* ``codec``: float32 / float16 / 8-bit blockwise (bitsandbytes) wire encodings and error feedback;
* ``protocol``: message builders and a checking parser; ``rendezvous``: DHT records and partner choice;
* ``flat``: a list of tensors seen as one flat vector.
"""
