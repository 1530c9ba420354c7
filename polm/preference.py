"""Preference pairs derived from the verifiable tasks, in TRL's preference formats.

The chosen answer is the reference; the rejected one is a plausible mistake of the kind a
small model makes, so a preference learner has to look at the content, not the shape:

- ``add``: a dropped carry (the scratchpad computed without carrying), or one digit of the
  final sum off by one (the scratchpad left intact);
- ``reverse``: a partly reversed word (one half left in order), or two letters swapped.

Pairs are fixed per split (seeded), like the tasks themselves.
"""

from __future__ import annotations

import json
import random
from functools import cache

from polm.tasks import ADD_DIGITS, Example, get_task, tool_call_text

PAIR_SEEDS = {"train": 11, "test": 12}


def _add_without_carry(a: int, b: int) -> str:
    da, db = str(a).zfill(ADD_DIGITS)[::-1], str(b).zfill(ADD_DIGITS)[::-1]
    steps, digits = [], []
    for x, y in zip(da, db):
        s = int(x) + int(y)  # the carry is dropped: written as if it were always 0
        steps.append(f"{x}+{y}+0={s:02d}")
        digits.append(str(s % 10))
    wrong = int("".join(reversed(digits)))
    return " ".join(steps) + f" => {wrong}"


def _off_by_one_digit(answer: str, rng: random.Random) -> str:
    head, total = answer.rsplit("=> ", 1)
    i = rng.randrange(len(total))
    d = int(total[i])
    new = (d + rng.choice([-1, 1])) % 10
    if i == 0 and new == 0 and len(total) > 1:
        new = (d + 1) % 10 or 1
    return head + "=> " + total[:i] + str(new) + total[i + 1 :]


def rejected_answer(task: str, ex: Example, rng: random.Random) -> str:
    """A plausible wrong answer for ``ex``, always different from the reference."""
    if task == "add":
        a, b = map(int, ex.prompt.split("+"))
        wrong = _add_without_carry(a, b)
        if rng.random() < 0.5 or wrong.endswith(f"=> {a + b}"):
            wrong = _off_by_one_digit(ex.answer, rng)
        return wrong
    if task == "reverse":
        word = ex.prompt.split(" ", 1)[1]
        good = word[::-1]
        for _ in range(10):
            if rng.random() < 0.5:
                half = len(word) // 2
                bad = word[:half] + word[half:][::-1] if rng.random() < 0.5 else word
            else:
                i = rng.randrange(len(good) - 1)
                bad = good[:i] + good[i + 1] + good[i] + good[i + 2 :]
            if bad != good:
                return bad
        return good[1:] + good[0] if good[1:] + good[0] != good else good + good[0]
    if task == "compare":
        return rng.choice([w for w in ("more", "less", "same") if w != ex.target])
    if task == "tool":  # the right tool, one argument off by one digit
        call = json.loads(ex.target)
        args = dict(call["arguments"])
        key = rng.choice(sorted(args))
        args[key] = int(_off_by_one_digit(f"=> {args[key]}", rng).split("=> ")[1])
        return tool_call_text(call["name"], args)
    raise ValueError(f"no preference pairs for task {task!r}")


@cache
def _pairs(task: str, split: str) -> tuple[tuple[Example, str], ...]:
    rng = random.Random(f"polm-pairs-{task}-{PAIR_SEEDS[split]}")
    return tuple((ex, rejected_answer(task, ex, rng)) for ex in get_task(task).examples(split))


def preference_pairs(task: str, split: str, n: int | None = None) -> list[dict]:
    """TRL conversational preference rows: ``prompt`` / ``chosen`` / ``rejected``."""
    rows = []
    for ex, bad in _pairs(task, split)[:n]:
        row = {
            "prompt": [{"role": "user", "content": ex.prompt}],
            "chosen": [{"role": "assistant", "content": ex.answer}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        rows.append({**row, "tools": list(ex.tools)} if ex.tools else row)
    return rows


def preference_dataset(task, dataset, n_train, seed):
    """Built-in pairs for ``task`` (one or several), or a user's preference file."""
    from datasets import Dataset

    from polm.data import check_columns, load_dataset_source
    from polm.stage import task_names

    if task is not None:
        rows = [r for t in task_names(task) for r in preference_pairs(t, "train", n_train)]
        return Dataset.from_list(rows).shuffle(seed=seed)
    ds = load_dataset_source(dataset, n_train)
    check_columns(ds, dataset, [{"prompt", "chosen", "rejected"}, {"chosen", "rejected"}])
    return ds


def unpaired(rows: list[dict]) -> list[dict]:
    """Pairs split into TRL's unpaired format (``completion`` + ``label``), as KTO uses."""
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out
