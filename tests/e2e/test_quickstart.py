"""The quickstart's chain, shrunk (every stage's steps cut, a small eval): every stage runs and
is evaluated, the report opens in headless Chromium with its plots and loads nothing from the
network, and the edge package answers as `bentoml serve` of the final model does."""

import json
import subprocess
import sys

import pytest
import yaml

from polm.checkpoint import Checkpoint
from polm.tasks import get_task
from tests.helpers import REPO, Server, free_port, polm_cli, stop_process_tree, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """recipes/quickstart.yaml with its steps cut to a few, run by `polm run`."""
    tmp = tmp_path_factory.mktemp("quickstart")
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    for spec in raw["stages"].values():
        if "max_steps" in spec.get("with", {}):
            spec["with"]["max_steps"] = min(spec["with"]["max_steps"], 12)
            spec["with"]["logging_steps"] = 4  # a loss curve of three points
    raw["gates"] = {}  # a dozen steps do not keep accuracy: the gates have their own test
    recipe = tmp / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    work = tmp / "run"
    proc = polm_cli("run", recipe, "--workdir", work, "--eval-n", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, raw, proc


def test_every_stage_runs_is_evaluated_and_the_end_says_how_to_serve(run):
    work, raw, proc = run
    report = json.loads((work / "report.json").read_text())
    rows = {r["id"]: r for r in report["stages"]}
    assert set(rows) == {"base", *raw["stages"]}
    for sid in raw["stages"]:
        assert rows[sid]["status"] == "ran"
        m = rows[sid]["metrics"]
        assert {"eval.add.accuracy", "eval.compare.accuracy", "size_bytes"} <= set(m), sid
        assert m["decode_tokens_per_s"] > 0, sid
    assert rows["student_onnx"]["metrics"]["size_bytes"] < rows["student"]["metrics"]["size_bytes"]
    assert (work / "packages" / "edge" / "SHA256SUMS").is_file()
    assert f"polm serve {work / 'student_onnx'}" in proc.stdout
    assert str(work / "report.html") in proc.stdout
    # a second run skips every stage and the package
    again = polm_cli("run", work.parent / "quickstart.yaml", "--workdir", work, "--eval-n", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    assert {r["status"] for r in report["stages"]} == {"cached"}
    assert report["packages"][0]["status"] == "cached"


def test_the_report_shows_its_plots_in_chromium_and_loads_nothing(run, tmp_path):
    from tests.e2e.test_serve import chromium

    work, raw, _ = run
    browser, driver = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        d.get((work / "report.html").as_uri())
        for plot in ("lineage", "accuracy", "size-accuracy", "loss"):
            figure = d.find_element(By.ID, f"plot-{plot}")
            svg = figure.find_element(By.TAG_NAME, "svg")
            assert svg.size["width"] > 200 and svg.size["height"] > 100, plot
        text = d.find_element(By.TAG_NAME, "body").text
        assert all(sid in text for sid in raw["stages"])
        # every request the page made: the file itself, nothing else
        urls = set()
        for entry in d.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.add(msg["params"]["request"]["url"])
        assert urls == {(work / "report.html").as_uri()}, urls
        d.save_screenshot(str(tmp_path / "report.png"))
    finally:
        d.quit()
    md = (work / "report.md").read_text()
    assert "report-plots/accuracy.svg" in md and (work / "report-plots" / "accuracy.svg").is_file()


def test_the_edge_package_answers_as_the_served_final_model(run, tmp_path):
    work, _, _ = run
    final = Checkpoint.open(work / "student_onnx")
    prompts = [e.prompt for e in get_task("add").examples("test", 10)]
    prompts += [e.prompt for e in get_task("compare").examples("test", 10)]
    server = Server(tmp_path, model=final.path)
    try:
        served = _greedy(server.client, server.model, prompts)
    finally:
        server.stop()
    from openai import OpenAI

    package, port = work / "packages" / "edge", free_port()
    proc = subprocess.Popen(
        [sys.executable, package / "polm_edge.py", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=package,  # not the repository: the package stands alone
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        edge = _greedy(client, client.models.list().data[0].id, prompts)
    finally:
        stop_process_tree(proc)
    assert edge == served


def _greedy(client, model: str, prompts: list[str]) -> list[str]:
    """One greedy chat answer per prompt from an OpenAI-compatible endpoint."""
    return [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": p}],
            temperature=0,
            max_tokens=48,
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
