"""The swarm's directory in the DHT: every key, every record schema, signing and validation.

Nothing here trains or serves: peers, the expert pool and the averager write and read the swarm's shared state
through :class:`~swarmtrain.dht.directory.SwarmDirectory`, and the dashboard only reads it.
"""
