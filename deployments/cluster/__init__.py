"""``irefine cluster``: the production topology on one machine, each part a real process on
loopback: PostgreSQL primary and streaming replica, Redis with AOF, two Prefect API replicas behind
HAProxy, two background-services processes, a supervised Dask scheduler with two workers, and two
``irefine worker`` nodes. See README "Running highly available"."""

from deployments.cluster.procs import ClusterError
from deployments.cluster.topology import Cluster, default_folder

__all__ = ["Cluster", "ClusterError", "default_folder"]
