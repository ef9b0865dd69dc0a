"""The Prefect UI of a test server, rendered by headless Chromium, shows a finished job's artifacts.

Chromium (Debian's ``chromium``, installed by ``scripts/setup.sh --services``) runs with the flags
of docs/architecture.md section 10 and ``--dump-dom`` / ``--screenshot`` after a virtual-time budget: no
driver, no DevTools session, nothing to download. The test opens the job's flow run page in the
default (React) UI, follows its artifact links, and checks each artifact page: the progress at
100%, the cycle table, and the convergence plot drawn (its orange line found in a screenshot).
Screenshots are kept under ``test-artifacts/``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from engine.core import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(url: str, *, budget_ms: int, screenshot: Path | None = None) -> str:
    """Load ``url`` in a fresh headless Chromium; return the rendered DOM (or take a screenshot)."""
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: run scripts/setup.sh --services"
    with tempfile.TemporaryDirectory(prefix="ire-chromium-") as profile:
        action = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        out = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1200",
             f"--virtual-time-budget={budget_ms}", *action, url],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def page_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def rendered(url: str, *expected: str) -> str:
    """The DOM of ``url`` once every ``expected`` string is in it; the UI fetches after it loads,
    so a slow machine gets a longer virtual-time budget on each try."""
    dom = ""
    for budget_ms in (10_000, 30_000, 60_000):
        dom = chromium(url, budget_ms=budget_ms)
        if all(s in dom or s in page_text(dom) for s in expected):
            return dom
    missing = [s for s in expected if s not in dom and s not in page_text(dom)]
    raise AssertionError(f"{url}: {missing} not rendered; page text: {page_text(dom)[:1500]}")


def orange_pixels(png: Path) -> int:
    """Pixels of the plot's best-so-far line colour (#ff7f0e), which nothing else in the UI uses."""
    from matplotlib.image import imread

    rgb = imread(png)[:, :, :3]
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    return int(((r > 0.9) & (g > 0.35) & (g < 0.65) & (b < 0.25)).sum())


def test_the_ui_shows_progress_cycle_table_and_plot_of_a_finished_job(
    prefect_server, prefect_api, ire_env
) -> None:
    from flows.artifacts import artifact_keys
    from flows.refine import refine

    job_id = f"ui-{uuid.uuid4().hex[:8]}"
    spec = JobSpec.parse({"problem": "sphere", "problem_params": {"dim": 3}, "strategy": "cmaes",
                          "batch_size": 6, "max_evaluations": 60, "seed": 2})  # fmt: skip
    state = refine(spec=spec, job_id=job_id, executor="local", return_state=True)
    assert state.is_completed()
    keys = artifact_keys(job_id)
    ui = prefect_server.url.removesuffix("/api")
    ARTIFACTS_DIR.mkdir(exist_ok=True)

    run_page = f"{ui}/v2/runs/flow-run/{state.state_details.flow_run_id}?tab=Artifacts"
    dom = rendered(run_page, keys.progress, keys.cycles, keys.summary)
    links = sorted(set(re.findall(r'href="(/v2/artifacts/artifact/[0-9a-f-]{36})"', dom)))
    assert len(links) == 3, links
    run_shot = ARTIFACTS_DIR / "ui-flow-run-artifacts.png"
    chromium(run_page, budget_ms=15_000, screenshot=run_shot)
    print(f"\nscreenshot: {run_shot}")

    pages = {}
    for link in links:
        dom = rendered(ui + link, "Artifact Key")
        key = next(k for k in (keys.progress, keys.cycles, keys.summary) if k in dom)
        pages[key] = (ui + link, dom)
    assert set(pages) == {keys.progress, keys.cycles, keys.summary}

    def settled(key: str, *expected: str) -> str:
        """The artifact page's text once ``expected`` is in it (its markdown renders lazily)."""
        url, dom = pages[key]
        if not all(s in dom or s in page_text(dom) for s in expected):
            dom = rendered(url, *expected)
        return dom

    assert "Progress: 100%" in page_text(settled(keys.progress, "Progress: 100%"))

    table = page_text(settled(keys.cycles, "batch best", "duration s", "cache hits"))
    header = "cycle best batch best evaluations failures cache hits duration s 1 "
    assert header in table, table[:800]

    summary = settled(keys.summary, 'src="data:image/svg+xml;base64,')  # the image, not the raw text
    assert len(re.findall(r'<img[^>]*src="data:image/svg\+xml;base64,[^"]+"', summary)) == 1
    summary_shot = ARTIFACTS_DIR / "ui-summary-plot.png"
    for budget_ms in (15_000, 30_000, 60_000):  # the screenshot, once the plot is drawn in it
        chromium(pages[keys.summary][0], budget_ms=budget_ms, screenshot=summary_shot)
        if orange_pixels(summary_shot) > 300:
            break
    print(f"screenshot: {summary_shot}")
    assert orange_pixels(summary_shot) > 300, "the convergence plot is not drawn in the summary page"
    assert orange_pixels(run_shot) < 50  # a control: the colour is the plot's, not the UI's


@pytest.mark.timeout(900)
def test_a_run_on_the_local_server_prints_an_address_that_opens_it_in_the_ui(ire_env, tmp_path: Path) -> None:
    """What the README's first command does: `irefine server start`, then `irefine run`, whose
    printed address opens the job's flow run, cycle tasks and artifacts in the UI."""
    from flows.artifacts import artifact_keys
    from tests.prefect_server import free_port
    from tests.test_cli import irefine

    env = {k: v for k, v in ire_env.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    started = irefine("server", "start", "--port", str(free_port()), env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = irefine("server", "status", "--json", env=env)
        server = json.loads(status.stdout)
        assert status.returncode == 0 and server["healthy"], status.stdout

        job_id = f"ui-local-{uuid.uuid4().hex[:8]}"
        run = irefine("run", "--problem", "sphere", "--problem-param", "dim=3", "--strategy", "cmaes",
                      "--batch-size", "6", "--max-evaluations", "60", "--seed", "2", "--job-id", job_id,
                      env=env, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        addresses = re.findall(r"Prefect UI: (\S+)", run.stdout)
        assert len(addresses) == 1 and addresses[0].startswith(server["ui_url"] + "/runs/flow-run/")
        assert f"irefine status {job_id}" in run.stdout and "irefine top" in run.stdout

        page = page_text(rendered(addresses[0], "propose-1", "evaluate-1", "record-1"))
        assert "refine" in page and "Completed" in page and f"[job {job_id} cycle 1]" in page
        keys = artifact_keys(job_id)
        flow_run_id = addresses[0].rsplit("/", 1)[1]
        artifacts_tab = f"{server['ui_url']}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts"
        rendered(artifacts_tab, keys.progress, keys.cycles, keys.summary)
    finally:
        stopped = irefine("server", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
