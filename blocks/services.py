"""The job services from saved blocks: a deployment run names a block set, and this builds the
same :class:`~engine.services.UnstartedServices` that the settings would, with the same defaults.

A block set ``NAME`` is a :class:`JobStoreBlock` saved as ``NAME`` (required), and optionally an
:class:`InferenceCacheBlock` and a :class:`DaskClusterBlock` saved under the same name; without
them the run uses the settings' cache and the run's executor parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prefect.exceptions import ObjectNotFound

from blocks.cache import InferenceCacheBlock
from blocks.dask_cluster import DaskClusterBlock
from blocks.job_store import JobStoreBlock
from engine.cache import CacheConfig
from engine.core import SpecError
from engine.execution import Executor
from engine.services import ExecutorKind, UnstartedServices, lent_or_opened_executor, open_executor
from engine.settings import Settings

__all__ = ["services_from_blocks"]


def _load_optional(block_type: type[InferenceCacheBlock] | type[DaskClusterBlock], name: str) -> object:
    try:
        return block_type.load(name, validate=True)
    except ValueError as exc:  # Prefect raises ValueError for a missing document
        if "Unable to find block document" in str(exc) or isinstance(exc.__cause__, ObjectNotFound):
            return None
        raise


def services_from_blocks(
    name: str,
    settings: Settings,
    *,
    executor: Executor | None = None,
    kind: ExecutorKind = "dask",
    dask_address: str | None = None,
) -> UnstartedServices:
    """The services of block set ``name``, before the executor starts: its job store, its inference
    cache (default: the settings') and its Dask cluster (default:
    :func:`~engine.services.open_executor`); a lent ``executor`` or ``kind="local"`` runs there
    instead of the block's cluster."""
    try:
        store_block = JobStoreBlock.load(name, validate=True)
    except ValueError as exc:
        raise SpecError(
            f"services {name!r}: no job-store block {name!r} ({exc}); save a JobStoreBlock under that name"
        ) from None
    cache_block = _load_optional(InferenceCacheBlock, name)
    cluster_block = _load_optional(DaskClusterBlock, name)
    open_one: Callable[[], Executor] = partial(open_executor, kind, dask_address, settings)
    if kind == "dask" and not dask_address and isinstance(cluster_block, DaskClusterBlock):
        open_one = cluster_block.get_executor
    start_executor, owns_executor = lent_or_opened_executor(executor, open_one)
    cache = (
        cache_block.config(settings.home)
        if isinstance(cache_block, InferenceCacheBlock)
        else CacheConfig.from_settings(settings)
    )
    store = store_block.get_store()
    return UnstartedServices(
        settings=settings,
        store=store,
        cache=cache,
        start_executor=start_executor,
        owns_executor=owns_executor,
        owned=(store.close,),
    )
