"""The quickstart's chain, shrunk (every stage's steps cut, a small eval), run as a newcomer runs
it: what it prints without -v (one result line per stage and the summary table; the libraries'
bars, warnings and logs go to each stage's log), every stage runs and is evaluated, the report
opens in headless Chromium with its plots and loads nothing from the network, and the edge
package answers as `bentoml serve` of the final model does."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import yaml

from polm.checkpoint import Checkpoint
from polm.tasks import get_task
from tests.helpers import REPO, Server, free_port, polm_cli, stop_process_tree, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOISE = (
    r"it/s",  # tqdm bars (transformers, datasets, weight loading)
    r"examples/s",
    r"Warning",  # FutureWarning, UserWarning ...
    r"\bINFO\b",
    r"\bWARN\b",
    r"'loss'",  # the trainer's printed log dicts
    r"Traceback",
)


def _polm(*args, cwd):
    """The CLI as a user runs it: tqdm's bars not turned off from outside, and matplotlib with
    no font cache yet (it builds one, and logs that, on a user's first report)."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="polm-mpl-")
    return polm_cli(*args, cwd=cwd, timeout=900, env=env, fresh=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """recipes/quickstart.yaml with its steps cut to a few, run by `polm run` from a directory
    outside the repository, without -v."""
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
    proc = _polm("run", recipe, "--workdir", work, "--eval-n", "8", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, raw, proc


def _ids(raw) -> list[str]:
    """What gets one line of output: the model, each stage and each package, in order."""
    return ["base", *raw["stages"], *[f"package {p}" for p in raw["packages"]]]


def test_the_output_is_one_line_per_stage_and_the_table(run):
    work, raw, proc = run
    shown = proc.stdout + proc.stderr
    for pattern in NOISE:
        assert not re.search(pattern, shown), f"{pattern!r} in the output:\n{shown}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ids = _ids(raw)
    assert len(lines) == len(ids), proc.stderr  # one line per model, stage and package
    for line, sid in zip(lines, ids):
        assert line.startswith(f"✓ {sid} ("), line
        assert " -> " in line and ("add " in line or sid.startswith("package"))
    assert f"polm run {raw['name']}" in proc.stdout and "add acc" in proc.stdout
    # what was not shown is kept: the trainer's log in the stage's log file
    assert "'loss'" in (work / "logs" / "add_expert.log").read_text()


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
    # a second run skips every stage and the package, and says so, one line each
    again = _polm(
        "run", work.parent / "quickstart.yaml", "--workdir", work, "--eval-n", "8", cwd=work.parent
    )
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    assert {r["status"] for r in report["stages"]} == {"cached"}
    assert report["packages"][0]["status"] == "cached"
    skipped = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(skipped) == len(_ids(raw)), again.stderr
    assert all("unchanged, skipped" in ln for ln in skipped), again.stderr


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


def test_verbose_shows_the_libraries_output(tmp_path):
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    first = next(iter(raw["stages"]))  # the quickstart's first training stage, alone
    raw["stages"] = {first: raw["stages"][first]}
    raw["stages"][first]["with"].update(max_steps=2, logging_steps=1)
    raw["gates"], raw["packages"] = {}, {}
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _polm("run", recipe, "--workdir", tmp_path / "run", "--eval-n", "4", "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'loss'" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "logs").exists()
