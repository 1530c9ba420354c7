"""What a newcomer sees from `polm run recipes/quickstart.yaml` without -v: one result line per
stage and the summary table; the libraries' bars, warnings and logs go to each stage's log."""

import os
import re

import pytest
import yaml

from tests.helpers import REPO, polm_cli

pytestmark = pytest.mark.e2e

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
    """The CLI as a user runs it: tqdm's bars not turned off from outside."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return polm_cli(*args, cwd=cwd, timeout=900, env=env)


def test_quickstart_shows_one_line_per_stage_and_the_table(tmp_path):
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    for spec in raw["stages"].values():
        if "max_steps" in spec.get("with", {}):
            spec["with"]["max_steps"] = 6  # the recipe's shape, shrunk
    raw["gates"] = {}  # six steps keep no accuracy; tests/e2e/test_gates_report.py has gates
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    work = tmp_path / "run"
    proc = _polm("run", recipe, "--workdir", work, "--eval-n", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    for pattern in NOISE:
        assert not re.search(pattern, shown), f"{pattern!r} in the output:\n{shown}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ids = ["base", *raw["stages"], *[f"package {p}" for p in raw["packages"]]]
    assert len(lines) == len(ids), proc.stderr  # one line per model, stage and package
    for line, sid in zip(lines, ids):
        assert line.startswith(f"✓ {sid} ("), line
        assert " -> " in line and ("add " in line or sid.startswith("package"))
    assert f"polm run {raw['name']}" in proc.stdout and "add acc" in proc.stdout
    # what was not shown is kept: the trainer's log in the stage's log file
    assert "'loss'" in (work / "logs" / "add_expert.log").read_text()

    again = _polm("run", recipe, "--workdir", work, "--eval-n", "8", cwd=tmp_path)
    assert again.returncode == 0
    skipped = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(skipped) == len(ids), again.stderr
    assert all("unchanged, skipped" in ln for ln in skipped), again.stderr


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
