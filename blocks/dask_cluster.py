"""The Dask-cluster block: an existing scheduler, a LocalCluster, or a cluster on Kubernetes."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.core.errors import SpecError, TransientError

if TYPE_CHECKING:
    from engine.execution.dask import DaskExecutor

ClusterKind = Literal["address", "local", "kubernetes"]

# A Kubernetes resource quantity: "500m", "2", "0.5", "512Mi", "4Gi", "1e3".
_QUANTITY = re.compile(r"^\d+(\.\d+)?([eE]\d+|m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
# A DaskCluster name: an RFC 1123 label short enough for "<name>-scheduler" (dask-kubernetes' rule).
_CLUSTER_NAME = re.compile(r"^(?=.{1,53}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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
    idle_timeout: int = Field(
        600,
        ge=0,
        description="seconds without a client or tasks after which the operator deletes the cluster "
        "(so a crashed flow leaves none behind); 0: never",
    )
    node_profile: str | None = Field(
        None, description="node pool of the pods: the label irefine/profile, e.g. 'small' or 'large'"
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="extra environment of scheduler and workers"
    )

    @field_validator("name")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        if not _CLUSTER_NAME.match(value.replace("{uuid}", "0" * 10)):
            raise ValueError(
                f"{value!r} is not a DaskCluster name: use lowercase letters, digits and '-', at most "
                "53 characters ('{uuid}' counts 10), e.g. 'irefine-{uuid}'"
            )
        return value

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

    def kubernetes_cluster_spec(self) -> dict[str, Any]:
        """The ``DaskCluster`` resource of kind 'kubernetes', made by dask-kubernetes'
        ``make_cluster_spec`` (a fresh name per call when the name holds '{uuid}')."""
        from dask_kubernetes.operator import make_cluster_spec
        from dask_kubernetes.operator.validation import validate_cluster_name

        spec = self._kubernetes()
        name = spec.name.replace("{uuid}", uuid.uuid4().hex[:10])
        validate_cluster_name(name)
        worker_command = ["dask", "worker", "--nthreads", str(self.threads_per_worker)]
        if self.memory_limit is not None:
            worker_command += ["--memory-limit", self.memory_limit]
        n = self.n_workers if self.n_workers is not None else self.adapt_minimum
        cluster: dict[str, Any] = make_cluster_spec(
            name=name,
            image=spec.image,
            n_workers=n if n is not None else 1,
            resources=spec.resources(),
            env=spec.env or None,
            worker_command=worker_command,
            idle_timeout=spec.idle_timeout,
        )
        cluster["metadata"]["labels"] = {"app.kubernetes.io/part-of": "irefine"}
        if spec.namespace is not None:
            cluster["metadata"]["namespace"] = spec.namespace
        for role in ("scheduler", "worker"):
            pod = cluster["spec"][role]["spec"]
            # The namespace enforces Pod Security "restricted" (deployments/k8s): the image's user.
            pod["securityContext"] = {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            for container in pod["containers"]:
                container["securityContext"] = {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                }
                if container.get("env") is None:
                    del container["env"]  # the CRD allows a list, not null
                if container.get("resources") is None:
                    del container["resources"]
            if spec.node_profile is not None:
                pod["nodeSelector"] = {"irefine/profile": spec.node_profile}
        # make_cluster_spec starts the scheduler as `dask-scheduler`, which distributed no longer
        # installs: the image has the `dask` command only.
        scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
        scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0", *scheduler["args"][3:]]
        return cluster

    def kubernetes_autoscaler_spec(self, cluster_name: str) -> dict[str, Any] | None:
        """The ``DaskAutoscaler`` that ``adapt()`` makes for an adaptive cluster, or None."""
        if not self.adaptive:
            return None
        return {
            "apiVersion": "kubernetes.dask.org/v1",
            "kind": "DaskAutoscaler",
            "metadata": {"name": cluster_name},
            "spec": {"cluster": cluster_name, "minimum": self.adapt_minimum, "maximum": self.adapt_maximum},
        }

    def kubernetes_cluster(
        self, *, asynchronous: bool = False, cluster_spec: dict[str, Any] | None = None
    ) -> Any:
        """A ``dask_kubernetes.operator.KubeCluster`` for :meth:`kubernetes_cluster_spec`, deleted
        when closed. Synchronous: creates the DaskCluster and waits for its scheduler (needs the
        Kubernetes API and the operator). Asynchronous (call it inside a running event loop):
        nothing is created until ``await cluster`` or ``async with cluster``."""
        KubeCluster = _kube_cluster_class()
        spec = self._kubernetes()
        loop = None
        if asynchronous:
            from tornado.ioloop import IOLoop

            loop = IOLoop.current()
        return KubeCluster(
            custom_cluster_spec=cluster_spec or self.kubernetes_cluster_spec(),
            namespace=spec.namespace,
            shutdown_on_close=True,
            asynchronous=asynchronous,
            loop=loop,
            quiet=True,
        )

    def _kubernetes(self) -> KubernetesClusterSpec:
        if self.kubernetes is None:
            raise SpecError("kind 'kubernetes' needs kubernetes={'image': ...}")
        return self.kubernetes

    @contextmanager
    def executor(self) -> Iterator[DaskExecutor]:
        """:meth:`get_executor` for a ``with`` block: closing it also deletes a cluster it started
        (a LocalCluster, or the DaskCluster of kind 'kubernetes')."""
        executor = self.get_executor()
        try:
            yield executor
        finally:
            executor.close()

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
        KubeCluster = _kube_cluster_class()  # a missing dask-kubernetes fails here, first
        import httpx

        spec = self.kubernetes_cluster_spec()
        try:
            return self.kubernetes_cluster(cluster_spec=spec)
        except (OSError, TimeoutError, httpx.HTTPError) as exc:
            # KubeCluster registered itself for closing at exit: a cluster that never started has
            # nothing to close, and closing it then would fail again (at exit, noisily).
            for failed in [c for c in KubeCluster._instances if c.name == spec["metadata"]["name"]]:
                KubeCluster._instances.discard(failed)
            reason = " ".join(str(exc).split())
            raise TransientError(
                f"cannot start a Dask cluster on Kubernetes (check the cluster's API, the Dask operator and "
                f"the service account's Role): {type(exc).__name__}: {reason}"
            ) from exc


def _kube_cluster_class() -> Any:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise SpecError(
            f"kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes ({exc})"
        ) from None
    return KubeCluster
