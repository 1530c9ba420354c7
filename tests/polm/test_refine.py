"""Self-refine: the critics find the first wrong step, and the revision loop raises accuracy."""

import json

from polm.refine import critique
from polm.tasks import get_task
from tests.helpers import polm_cli

ADD = get_task("add")


def _example(prompt):
    return next(e for e in ADD.examples("test") + ADD.examples("train") if e.prompt == prompt)


def test_add_critic_names_the_first_wrong_step():
    ex = get_task("add").examples("test")[0]
    assert critique("add", ex, ex.answer) is None
    a, b = map(int, ex.prompt.split("+"))
    steps = ex.answer.split(" => ")[0].split()
    bad_step = steps[0][:-1] + str((int(steps[0][-1]) + 1) % 10)
    c = critique("add", ex, " ".join([bad_step, *steps[1:]]) + f" => {a + b}")
    assert c.message.startswith("step 1") and c.prefix == steps[0] + " " and not c.complete
    c = critique("add", ex, " ".join(steps) + f" => {a + b + 1}")
    assert c.complete and c.prefix == ex.answer
    assert critique("add", ex, "no idea").message.startswith("step 1")


def test_reverse_critic():
    ex = get_task("reverse").examples("test")[0]
    assert critique("reverse", ex, ex.target) is None
    wrong = ex.target[0] + ("a" if ex.target[1] != "a" else "b") + ex.target[2:]
    c = critique("reverse", ex, wrong)
    assert c.message.startswith("letter 2") and c.prefix == ex.target[:2]


def test_self_refine_raises_accuracy_and_the_loop_runs(warm_sft, tmp_path):
    trace = tmp_path / "trace.jsonl"
    r = polm_cli(
        "eval",
        warm_sft.path,
        "--task",
        "add",
        "--n",
        "100",
        "--self-refine",
        "2",
        "--trace",
        trace,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["eval.add.self_refine_accuracy"] >= m["eval.add.accuracy"] + 0.2, m
    assert m["eval.add.self_refine_revised"] > 0
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == 100
    revised = [row for row in rows if len(row["answers"]) > 1]
    assert len(revised) == m["eval.add.self_refine_revised"]
    fixed = [row for row in revised if ADD.score(row["answers"][-1], _example(row["prompt"]))]
    assert fixed and all(row["critiques"] for row in revised)
    # the revision is the model's own continuation: it differs from the critic's prefix alone
    assert any(len(row["answers"][1]) > 10 for row in revised)
