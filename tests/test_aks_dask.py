"""DaskClusterBlock(kind="kubernetes"): the DaskCluster it asks the Dask operator for, checked
against the CRD in the dask-kubernetes wheel, and the real KubeCluster it builds from it."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest

from blocks.dask_cluster import DaskClusterBlock
from engine.core.errors import TransientError
from tests.test_aks import validate_against_crd


def kubernetes_block(**settings: object) -> DaskClusterBlock:
    spec = {
        "image": "irefineacr.azurecr.io/irefine:0.1.0",
        "namespace": "irefine",
        "cpu_request": "1",
        "cpu_limit": "1",
        "memory_request": "2Gi",
        "memory_limit": "2Gi",
        "node_profile": "small",
        "env": {"IRE_LOG_FORMAT": "json"},
    }
    return DaskClusterBlock(kind="kubernetes", kubernetes=spec, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"adapt_minimum": 1, "adapt_maximum": 8, "threads_per_worker": 2, "memory_limit": "1800MiB"},
        {"n_workers": 3},
    ],
)
def test_cluster_spec_validates_against_the_operator_crd(settings: dict[str, object]) -> None:
    block = kubernetes_block(**settings)
    spec = block.kubernetes_cluster_spec()
    validate_against_crd(spec)
    assert spec["spec"]["idleTimeout"] == 600  # a crashed flow's cluster goes away by itself
    for role in ("scheduler", "worker"):
        pod = spec["spec"][role]["spec"]
        assert pod["nodeSelector"] == {"irefine/profile": "small"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert {"name": "IRE_LOG_FORMAT", "value": "json"} in container["env"]
        assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    autoscaler = block.kubernetes_autoscaler_spec(spec["metadata"]["name"])
    if block.adaptive:
        assert autoscaler is not None
        validate_against_crd(autoscaler)
        assert (autoscaler["spec"]["minimum"], autoscaler["spec"]["maximum"]) == (1, 8)
    else:
        assert autoscaler is None


def test_each_call_names_a_fresh_cluster_and_a_fixed_name_is_kept() -> None:
    block = kubernetes_block()
    names = {block.kubernetes_cluster_spec()["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    fixed = DaskClusterBlock(kind="kubernetes", kubernetes={"image": "x", "name": "irefine-shared-2"})
    assert fixed.kubernetes_cluster_spec()["metadata"]["name"] == "irefine-shared-2"


@pytest.mark.parametrize("name", ["Irefine_{uuid}", "irefine-" + "x" * 40 + "-{uuid}", "-irefine"])
def test_an_invalid_cluster_name_is_refused_with_what_to_use(name: str) -> None:
    with pytest.raises(ValueError, match="is not a DaskCluster name: use lowercase") as info:
        DaskClusterBlock(kind="kubernetes", kubernetes={"image": "x", "name": name})
    assert "e.g. 'irefine-{uuid}'" in str(info.value)


def test_the_pods_commands_exist_in_the_image() -> None:
    """The scheduler and workers run console scripts that this venv (the image's lock) installs:
    make_cluster_spec's own `dask-scheduler` does not exist in current distributed."""
    spec = kubernetes_block().kubernetes_cluster_spec()
    for role in ("scheduler", "worker"):
        (container,) = spec["spec"][role]["spec"]["containers"]
        command = container["args"][0]
        assert (Path(sys.executable).parent / command).exists() or shutil.which(command), command
        assert container["args"][1] == role


def test_the_crd_rejects_what_the_operator_would() -> None:
    spec = kubernetes_block().kubernetes_cluster_spec()
    del spec["spec"]["scheduler"]["service"]
    with pytest.raises(jsonschema.ValidationError, match="service"):
        validate_against_crd(spec)


def test_the_block_builds_a_real_kube_cluster_from_its_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KubeCluster from dask-kubernetes, asynchronous so that nothing is created until awaited;
    awaiting it talks to the (here unreachable) Kubernetes API of the kubeconfig."""
    from dask_kubernetes.operator import KubeCluster

    monkeypatch.setenv("KUBECONFIG", str(unreachable_kubeconfig(tmp_path)))
    block = kubernetes_block(adapt_minimum=1, adapt_maximum=4)

    async def build_and_start() -> Exception:
        cluster = block.kubernetes_cluster(asynchronous=True)
        assert isinstance(cluster, KubeCluster)
        assert cluster.shutdown_on_close is True and cluster.namespace == "irefine"
        assert cluster.name == cluster._custom_cluster_spec["metadata"]["name"]
        validate_against_crd(cluster._custom_cluster_spec)
        try:
            await cluster
        except Exception as exc:
            return exc
        raise AssertionError("a cluster started without a Kubernetes API")

    failure = asyncio.run(build_and_start())
    assert "connect" in f"{type(failure).__name__} {failure}".lower()


def test_get_executor_without_a_reachable_cluster_is_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(unreachable_kubeconfig(tmp_path)))
    with pytest.raises(TransientError, match="cannot start a Dask cluster on Kubernetes") as info:
        kubernetes_block().get_executor()
    assert "\n" not in str(info.value)


def unreachable_kubeconfig(folder: Path) -> Path:
    """A kubeconfig whose API server is a closed loopback port."""
    from tests.prefect_server import free_port

    path = folder / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: closed
  cluster: {{server: "https://127.0.0.1:{free_port()}"}}
contexts:
- name: closed
  context: {{cluster: closed, user: nobody, namespace: irefine}}
current-context: closed
users:
- name: nobody
  user: {{token: none}}
"""
    )
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_executor_context_manager_closes_the_cluster_it_started() -> None:
    from distributed.core import Status

    block = DaskClusterBlock(kind="local", n_workers=1)
    with block.executor() as executor:
        cluster = executor.client.cluster
        assert executor.client.submit(sum, [1, 2]).result() == 3
    assert cluster.status is Status.closed
