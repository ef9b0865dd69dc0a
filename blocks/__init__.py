"""Prefect blocks: the engine's configuration as saved documents, and factories for its clients.

Three block types, registered with ``prefect block register -m blocks``:

- :class:`InferenceCacheBlock` (``irefine-inference-cache``): Redis URL (secret), namespace, TTL.
- :class:`DaskClusterBlock` (``irefine-dask-cluster``): a scheduler address, or a local or
  Kubernetes cluster spec, optionally adaptive.
- :class:`JobStoreBlock` (``irefine-job-store``): database URL (secret) and optional read replica.

Blocks hold settings and make clients (``get_client``, ``get_executor``, ``get_store``); the
caller owns what they make and closes it. No workflow logic lives here.
"""

from blocks.cache import InferenceCacheBlock
from blocks.dask_cluster import DaskClusterBlock, KubernetesClusterSpec
from blocks.job_store import JobStoreBlock

__all__ = ["InferenceCacheBlock", "DaskClusterBlock", "KubernetesClusterSpec", "JobStoreBlock"]
