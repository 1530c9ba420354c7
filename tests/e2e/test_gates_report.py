"""Quality gates and the run report, through the real `polm run` and `polm report`."""

import json

import pytest
import yaml

from polm.checkpoint import Checkpoint
from polm.gates import Gate, check_gate
from polm.report import pareto_front
from tests.helpers import polm_cli

pytestmark = pytest.mark.e2e


def _recipe(tmp_path, gates=None, name="gated"):
    raw = {
        "name": name,
        "seed": 0,
        "models": {"base": "builtin:tiny-base"},
        "eval": ["add"],
        "stages": {
            "sft": {"uses": "align.sft", "from": "base", "with": {"task": "add", "max_steps": 40}},
            "more": {"uses": "align.sft", "from": "sft", "with": {"task": "add", "max_steps": 4}},
            "after": {"uses": "align.sft", "from": "more", "with": {"task": "add", "max_steps": 2}},
            "side": {
                "uses": "align.sft",
                "from": "base",
                "with": {"task": "reverse", "max_steps": 2},
            },
        },
        "gates": gates or {},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _report(work):
    return json.loads((work / "report.json").read_text())


def test_a_failed_gate_stops_what_is_downstream_and_keeps_what_came_before(tmp_path):
    work = tmp_path / "run"
    # a size no checkpoint of tiny-base fits in: the gate must fail, with its figures
    recipe = _recipe(tmp_path, gates={"more": {"max_mb": 0.01, "keeps": {"add": 0.5}}})
    proc = polm_cli("run", recipe, "--workdir", work, "--eval-n", "16")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "quality gate failed" in err and "'more'" in err and "size <= 0.01 MB" in err
    size_mb = Checkpoint.open(work / "more").manifest.metrics["size_bytes"] / 2**20
    assert f"{size_mb:.2f} MB" in err  # the figure itself
    assert "after" in err.split("Not run")[1]
    assert not (work / "after").exists()  # downstream of the failed gate: never ran
    assert (work / "side").is_dir()  # independent of it: ran
    rows = {r["id"]: r for r in _report(work)["stages"]}
    assert rows["after"]["status"] == "blocked"
    gates = {g["gate"]: g["passed"] for g in rows["more"]["gates"]}
    assert gates == {"keeps 50% of sft's add accuracy": True, "size <= 0.01 MB": False}
    html = (work / "report.html").read_text()
    assert "FAILED" in html and "blocked" in html

    # the stages before the gate are kept and cached; --no-gates runs through
    proc = polm_cli("run", recipe, "--workdir", work, "--eval-n", "16", "--no-gates")
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {r["id"]: r["status"] for r in _report(work)["stages"]}
    assert status == {
        "base": "cached",
        "sft": "cached",
        "more": "cached",
        "after": "ran",
        "side": "cached",
    }
    # a gate that passes: the run goes through, exit code 0
    ok = _recipe(tmp_path, gates={"more": {"max_mb": 100}})
    proc = polm_cli("run", ok, "--workdir", work, "--eval-n", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "polm serve" in proc.stdout


def test_gates_are_checked_when_the_recipe_loads(tmp_path):
    for gates, words in [
        ({"nope": {"max_mb": 1}}, ["gates.nope", "no stage 'nope'"]),
        ({"more": {"keeps": {"reverse": 0.9}}}, ["gates.more", "reverse", "eval"]),
        ({"more": {"keeps": {"add": 97}}}, ["keeps.add = 97", "0.97 means 97%"]),
        ({"more": {"max_size": 1}}, ["max_size"]),
    ]:
        proc = polm_cli("validate", _recipe(tmp_path, gates=gates, name="bad"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr


def test_gate_figures():
    gate = Gate(keeps={"add": 0.97}, min_accuracy={"add": 0.9})
    passed = check_gate("q", gate, {"eval.add.accuracy": 0.95}, "p", {"eval.add.accuracy": 0.97})
    assert [g.passed for g in passed] == [True, True]
    failed = check_gate("q", gate, {"eval.add.accuracy": 0.80}, "p", {"eval.add.accuracy": 0.97})
    assert [g.passed for g in failed] == [False, False]
    assert failed[0].figures == "80.0% against 97.0%: keeps 82.5%"


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 50, "a"), (2.0, 40, "b"), (3.0, 80, "c"), (4.0, 79, "d"), (0.5, 10, "e")]
    assert [p[2] for p in pareto_front(pts)] == ["e", "a", "c"]
