"""Prefect results on Azure Blob storage, for real: Azurite (the Azure Storage emulator, installed by
scripts/setup.sh --services) on loopback, an AzureBlobStorageContainer block saved on a real Prefect
server, and the refine flow's persisted describe-problem result written there and read back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.spec import JobSpec
from irefine.server import stop_process
from tests.prefect_server import free_port

REPO = Path(__file__).resolve().parent.parent
AZURITE = REPO / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (documented, not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Azurite blob service on a loopback port; yields its connection string."""
    if not AZURITE.exists():
        pytest.fail("Azurite is missing: run scripts/setup.sh --services (npm install)", pytrace=False)
    port = free_port()
    folder = tmp_path_factory.mktemp("azurite")
    log = (folder / "azurite.log").open("wb")
    process = subprocess.Popen(
        [
            str(AZURITE),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(folder),
            "--skipApiVersionCheck",
            "--silent",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Azurite did not start: {(folder / 'azurite.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        )
    finally:
        stop_process(process, 10)
        log.close()


@pytest.fixture
def results_container(azurite: str, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A fresh blob container, saved as the AzureBlobStorageContainer block IRE_RESULT_STORAGE names."""
    from azure.storage.blob import BlobServiceClient
    from prefect_azure import AzureBlobStorageContainer, AzureBlobStorageCredentials

    name = f"results-{uuid.uuid4().hex[:12]}"
    service = BlobServiceClient.from_connection_string(azurite)
    container = service.create_container(name)
    credentials = AzureBlobStorageCredentials(connection_string=azurite)
    block_name = f"ire-test-{name}"
    AzureBlobStorageContainer(container_name=name, credentials=credentials, base_folder="prefect").save(
        block_name, overwrite=True
    )
    monkeypatch.setenv("IRE_RESULT_STORAGE", f"azure-blob-storage-container/{block_name}")
    yield container
    AzureBlobStorageContainer.delete(block_name)
    service.delete_container(name)


def describe_state(flow_run_id: object) -> str:
    """The describe-problem task run's final state name, once the server has it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return {r.name: r.state.name for r in runs if r.state is not None}

    states: dict[str, str] = {}
    for _ in range(120):  # task-run states reach the server through events
        states = asyncio.run(read())
        if states.get("describe-problem") in ("Completed", "Cached"):
            return states["describe-problem"]
        time.sleep(0.5)
    raise AssertionError(f"describe-problem did not finish: {states}")


def test_results_are_written_to_blob_storage_and_read_back_by_a_later_run(
    results_container: object, ire_env: dict[str, str]
) -> None:
    from flows.refine import refine

    container = results_container
    version = f"azure-{uuid.uuid4().hex[:8]}"  # a cache key of this test's own
    params = {"dim": 3, "version": version}

    def run(index: int) -> str:
        spec = JobSpec.parse({"problem": "sphere", "problem_params": params, "strategy": "random",
                              "batch_size": 4, "max_evaluations": 8})  # fmt: skip
        state = refine(spec=spec, job_id=f"azure-{version}-{index}", executor="local", return_state=True)
        assert state.is_completed()
        report = state.result()  # the flow returns `irefine status --json` as a JobStatusReport
        assert report.status == "completed" and report.spec["problem_params"]["version"] == version
        return describe_state(state.state_details.flow_run_id)

    assert run(0) == "Completed"
    blobs = list(container.list_blobs())  # type: ignore[attr-defined]
    assert blobs and all(b.name.startswith("prefect/") for b in blobs)
    stored = [json.loads(container.download_blob(b.name).readall()) for b in blobs]  # type: ignore[attr-defined]
    assert any(version in json.dumps(record) for record in stored)  # the description itself, as JSON

    assert run(1) == "Cached"  # read back from the blob

    for blob in blobs:  # without the blob the cache misses: the hit above came from storage
        container.delete_blob(blob.name)  # type: ignore[attr-defined]
    assert run(2) == "Completed"
    assert list(container.list_blobs())  # type: ignore[attr-defined]  # and it is written again
