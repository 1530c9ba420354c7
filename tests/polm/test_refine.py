"""Self-refine: the verifier says where an answer is wrong and never what is right; the model
critiques and revises its own answers; the critique skill's training rows."""

import json
import random
import re

import pytest

from polm.refine import RIGHT, critique, critique_rows, prefix_for
from polm.tasks import get_task
from tests.helpers import polm_cli

ADD = get_task("add")
MESSAGE = re.compile(
    r"^(step \d+ is (wrong|missing)|the total is wrong|there are too many steps"
    r"|letter \d+ is wrong|the answer is (wrong|too long|too short))\.$"
)


def _mutations(answer: str, rng: random.Random, n: int) -> list[str]:
    """Wrong answers of the kinds a model writes: a digit changed, a step dropped or repeated,
    a total off, the answer cut short, noise."""
    out = []
    for _ in range(n):
        chars = list(answer)
        kind = rng.randrange(5)
        if kind == 0:
            digits = [i for i, c in enumerate(chars) if c.isdigit()]
            for i in rng.sample(digits, rng.randint(1, 3)):
                chars[i] = str(rng.randrange(10))
            out.append("".join(chars))
        elif kind == 1:
            steps = answer.split(" ")
            del steps[rng.randrange(len(steps))]
            out.append(" ".join(steps))
        elif kind == 2:
            steps = answer.split(" ")
            i = rng.randrange(len(steps))
            out.append(" ".join(steps[: i + 1] + steps[i:]))
        elif kind == 3:
            out.append(answer[: rng.randrange(len(answer))])
        else:
            out.append("".join(rng.choice("0123456789+= =>x") for _ in range(rng.randrange(30))))
    return out


def _text(text: str) -> str:
    return "".join(text.split())


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def test_the_verifier_says_where_never_what_and_keeps_only_the_models_own_digits():
    rng = random.Random(0)
    checked = 0
    for ex in ADD.examples("test", 300):
        assert critique("add", ex, ex.answer) is None
        for answer in _mutations(ex.answer, rng, 8):
            c = critique("add", ex, answer)
            if c is None:
                assert ADD.score(answer, ex)
                continue
            checked += 1
            assert MESSAGE.match(c.message), c.message
            # every digit of the prefix the revision starts from is the model's, in its order
            assert _digits(answer).startswith(_digits(c.prefix)), (answer, c)
            # and it is the model's text (spaces aside), up to the "=>" a total is written after
            assert _text(answer).startswith(_text(c.prefix).removesuffix("=>")), (answer, c)
            # and the model's own critique, read the same way, starts from the same place
            assert prefix_for("add", answer, c.message) == c.prefix
    assert checked > 2000


def test_the_verifier_names_the_first_wrong_step():
    ex = ADD.examples("test")[0]
    a, b = map(int, ex.prompt.split("+"))
    steps = ex.answer.split(" => ")[0].split()
    bad = steps[0][:-1] + str((int(steps[0][-1]) + 1) % 10)
    c = critique("add", ex, " ".join([bad, *steps[1:]]) + f" => {a + b}")
    assert (c.message, c.prefix) == ("step 1 is wrong.", "")
    c = critique("add", ex, " ".join([steps[0], bad, *steps[2:]]) + f" => {a + b}")
    assert (c.message, c.prefix) == ("step 2 is wrong.", steps[0] + " ")
    c = critique("add", ex, " ".join(steps) + f" => {a + b + 1}")
    assert (c.message, c.prefix) == ("the total is wrong.", " ".join(steps) + " => ")
    assert str(a + b) not in c.message + c.prefix
    rev = get_task("reverse").examples("test")[0]
    assert critique("reverse", rev, rev.target) is None
    wrong = rev.target[0] + ("a" if rev.target[1] != "a" else "b") + rev.target[2:]
    c = critique("reverse", rev, wrong)
    assert (c.message, c.prefix) == ("letter 2 is wrong.", rev.target[:1])


def test_critique_rows_teach_the_verdict_and_the_revision():
    examples = ADD.examples("train", 2)
    right, wrong = examples[0].answer, _mutations(examples[1].answer, random.Random(1), 1)[0]
    assert critique("add", examples[1], wrong) is not None
    rows = critique_rows("add", examples, [right, wrong])
    assert [r["completion"][0]["content"] for r in rows][:1] == [RIGHT]
    assert len(rows) == 3  # the wrong answer gets a critique row and a revision row
    verdict, revision = rows[1], rows[2]
    assert verdict["prompt"][1]["content"] == wrong.strip()
    assert MESSAGE.match(verdict["completion"][0]["content"])
    assert revision["prompt"][-2]["content"] == verdict["completion"][0]["content"]
    assert revision["completion"][0]["content"] == examples[1].answer


@pytest.mark.parametrize("critic", ["self", "verifier"])
def test_self_refine_runs_with_either_critic_and_traces_it(critic, warm_sft, tmp_path):
    """The loop's mechanics on a model without the critique skill (the gains are measured in
    recipes/refine.yaml and bench/calibrations/test_refine.py)."""
    trace = tmp_path / "trace.jsonl"
    r = polm_cli(
        "eval",
        warm_sft.path,
        "--task",
        "add",
        "--n",
        "40",
        "--self-refine",
        "2",
        "--critic",
        critic,
        "--trace",
        trace,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    key = f"eval.add.refine_{critic}"
    assert 0 <= m[f"{key}.accuracy"] <= 1 and m[f"{key}.rounds"] == 2
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == 40 and {row["critic"] for row in rows} == {critic}
    assert all(row["critiques"] for row in rows)
    revised = [row for row in rows if len(row["answers"]) > 1]
    assert len(revised) == m[f"{key}.revised"]
    if critic == "verifier":  # warm_sft is wrong on most: the verifier flags them all
        wrong = sum(not ADD.score(row["answers"][0], _example(row["prompt"])) for row in rows)
        assert m[f"{key}.revised"] >= wrong > 0
        assert m[f"{key}.critic_agreement"] >= 0.95  # the scorer reads the total only


def _example(prompt):
    return next(e for e in ADD.examples("test") if e.prompt == prompt)
