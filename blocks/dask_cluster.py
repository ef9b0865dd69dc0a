"""The Dask-cluster block: an existing scheduler, a LocalCluster, or a cluster on Kubernetes."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.core.errors import SpecError, TransientError

if TYPE_CHECKING:
    from engine.execution.dask import DaskExecutor

ClusterKind = Literal["address", "local", "kubernetes"]

# A Kubernetes resource quantity: "500m", "2", "0.5", "512Mi", "4Gi", "1e3".
_QUANTITY = re.compile(r"^\d+(\.\d+)?([eE]\d+|m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


class KubernetesClusterSpec(BaseModel):
    """A Dask cluster run by the Dask Kubernetes operator: image, namespace and pod resources."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(min_length=1, description="image of the scheduler and workers; must hold this project")
    namespace: str | None = Field(None, description="Kubernetes namespace; default: the current one")
    name: str = Field(
        "irefine-{uuid}", min_length=1, description="DaskCluster name; '{uuid}' makes a fresh one per run"
    )
    cpu_request: str | None = Field(None, description="CPU request per pod, e.g. '1' or '500m'")
    cpu_limit: str | None = Field(None, description="CPU limit per pod")
    memory_request: str | None = Field(None, description="memory request per pod, e.g. '2Gi'")
    memory_limit: str | None = Field(None, description="memory limit per pod (Dask workers read it)")

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity: use e.g. '500m', '2', '512Mi', '4Gi'")
        return value

    def resources(self) -> dict[str, dict[str, str]] | None:
        """The pods' ``resources`` (requests and limits), or None if none is set."""
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        spec = {
            section: {k: v for k, v in values.items() if v is not None}
            for section, values in (("requests", requests), ("limits", limits))
        }
        spec = {section: values for section, values in spec.items() if values}
        return spec or None


class DaskClusterBlock(Block):
    """Where evaluations run: an existing scheduler (``address``), a process ``LocalCluster``
    (``local``) or a Dask-operator cluster (``kubernetes``), optionally adaptive.

    ``get_executor()`` connects or starts the cluster and returns a
    :class:`~engine.execution.dask.DaskExecutor`; the caller owns it and closes it, which also
    shuts down a cluster the executor started.
    """

    _block_type_name: ClassVar[str | None] = "Refinement Dask Cluster"
    _block_type_slug: ClassVar[str | None] = "irefine-dask-cluster"

    kind: ClusterKind = Field(
        "local", description="'address': an existing scheduler; 'local': a LocalCluster; 'kubernetes'"
    )
    address: str | None = Field(
        None, description="scheduler address for kind 'address', e.g. tcp://host:8786"
    )
    n_workers: int | None = Field(
        None, ge=1, description="workers to start with; default: adapt_minimum, else CPU count (local)"
    )
    threads_per_worker: int = Field(1, ge=1, description="threads per worker process")
    memory_limit: str | None = Field(None, description="Dask memory limit per worker, e.g. '4GiB'")
    adapt_minimum: int | None = Field(None, ge=0, description="adaptive scaling: fewest workers")
    adapt_maximum: int | None = Field(None, ge=1, description="adaptive scaling: most workers")
    kubernetes: KubernetesClusterSpec | None = Field(None, description="the cluster, for kind 'kubernetes'")

    @model_validator(mode="after")
    def _consistent(self) -> DaskClusterBlock:
        if self.kind == "address":
            if not self.address:
                raise ValueError("kind 'address' needs address, e.g. address='tcp://scheduler:8786'")
            extra = [
                name
                for name in ("n_workers", "memory_limit", "adapt_minimum", "adapt_maximum", "kubernetes")
                if getattr(self, name) is not None
            ]
            if extra:
                raise ValueError(f"kind 'address' uses a running scheduler as is: unset {', '.join(extra)}")
            return self
        if self.address is not None:
            raise ValueError(f"address is only for kind 'address', not {self.kind!r}: unset it or set kind")
        if self.kind == "kubernetes" and self.kubernetes is None:
            raise ValueError("kind 'kubernetes' needs kubernetes={'image': ...} (a KubernetesClusterSpec)")
        if self.kind == "local" and self.kubernetes is not None:
            raise ValueError("kubernetes is only for kind 'kubernetes': unset it or set kind='kubernetes'")
        low, high = self.adapt_minimum, self.adapt_maximum
        if (low is None) != (high is None):
            raise ValueError("set both adapt_minimum and adapt_maximum for adaptive scaling, or neither")
        if low is not None and high is not None:
            if low > high:
                raise ValueError(f"adapt_minimum ({low}) exceeds adapt_maximum ({high})")
            if self.n_workers is not None and not low <= self.n_workers <= high:
                raise ValueError(
                    f"n_workers ({self.n_workers}) must lie within adapt_minimum..adapt_maximum "
                    f"({low}..{high})"
                )
        return self

    @property
    def adaptive(self) -> bool:
        """True if the cluster scales between ``adapt_minimum`` and ``adapt_maximum``."""
        return self.adapt_minimum is not None and self.adapt_maximum is not None

    def local_cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the ``distributed.LocalCluster`` that kind 'local' starts."""
        n = self.n_workers if self.n_workers is not None else self.adapt_minimum
        kwargs: dict[str, Any] = {
            "n_workers": n if n is not None else os.cpu_count() or 1,
            "threads_per_worker": self.threads_per_worker,
            "processes": True,
            "dashboard_address": ":0",  # any free port: two clusters on one machine must not clash
        }
        kwargs["memory_limit"] = self._worker_memory_limit(kwargs["n_workers"])
        return kwargs

    def _worker_memory_limit(self, n_workers: int) -> int:
        """Bytes per local worker: ``memory_limit``, or the settings' default share of this machine
        (the same rule as the settings' LocalCluster, so a leaking worker is restarted)."""
        from engine.execution.dask import worker_memory_limit

        return worker_memory_limit(self.memory_limit, n_workers)

    def kubernetes_cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the ``dask_kubernetes.operator.KubeCluster`` that kind 'kubernetes' starts."""
        if self.kubernetes is None:
            raise SpecError("kind 'kubernetes' needs kubernetes={'image': ...}")
        spec = self.kubernetes
        command = ["dask", "worker", "--nthreads", str(self.threads_per_worker)]
        if self.memory_limit is not None:
            command += ["--memory-limit", self.memory_limit]
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "namespace": spec.namespace,
            "image": spec.image,
            "resources": spec.resources(),
            "worker_command": command,
        }
        n = self.n_workers if self.n_workers is not None else self.adapt_minimum
        if n is not None:
            kwargs["n_workers"] = n
        return kwargs

    def get_executor(self) -> DaskExecutor:
        """Connect to or start the cluster; the caller closes the executor (and so the cluster)."""
        # distributed ships no annotations: its calls are untyped, hence the ignores below.
        from distributed import Client

        from engine.execution.dask import DaskExecutor

        if self.kind == "address":
            try:
                return DaskExecutor(Client(self.address, set_as_default=False))  # type: ignore[no-untyped-call]
            except OSError as exc:
                reason = " ".join(str(exc).split())
                raise TransientError(
                    f"cannot reach the Dask scheduler at {self.address!r} (check the address): {reason}"
                ) from exc
        cluster = self._start_cluster()
        try:
            if self.adaptive:
                cluster.adapt(minimum=self.adapt_minimum, maximum=self.adapt_maximum)
            client = Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
        except BaseException:
            cluster.close()
            raise
        return DaskExecutor(client, cluster)

    def _start_cluster(self) -> Any:
        if self.kind == "local":
            from engine.execution.dask import start_local_cluster

            return start_local_cluster(**self.local_cluster_kwargs())
        try:
            from dask_kubernetes.operator import KubeCluster
        except ImportError as exc:
            raise SpecError(
                f"kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes ({exc})"
            ) from None
        return KubeCluster(**self.kubernetes_cluster_kwargs())
