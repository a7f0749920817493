"""The swarm dashboard: a read-only web page, JSON API and Prometheus metrics of one run's health.

``DashboardServer`` joins nothing by itself: give it a :class:`~swarmtrain.dht.directory.SwarmDirectory` over a
(client-mode) DHT node, ``start()`` it, and open ``server.url``. See ``dashboard/API.md`` for the endpoints.
"""
from swarmtrain.dashboard.server import DashboardServer

__all__ = ["DashboardServer"]
