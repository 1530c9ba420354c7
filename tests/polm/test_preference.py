import pytest

from polm.evaluate import evaluate_checkpoint
from polm.preference import preference_pairs, unpaired
from polm.tasks import get_task


@pytest.mark.parametrize("task", ["add", "reverse"])
def test_pairs_are_fixed_and_rejected_answers_are_plausible_but_wrong(task):
    t = get_task(task)
    for split in ("train", "test"):
        rows = preference_pairs(task, split, 300)
        assert rows == preference_pairs(task, split, 300)
        for row, ex in zip(rows, t.examples(split, 300)):
            assert row["prompt"][0]["content"] == ex.prompt
            assert t.score(row["chosen"][0]["content"], ex) == 1.0
            bad = row["rejected"][0]["content"]
            assert t.score(bad, ex) == 0.0
            assert len(bad) >= len(ex.answer) - 2  # same shape, different content
    kinds = unpaired(preference_pairs(task, "train", 10))
    assert [r["label"] for r in kinds[:2]] == [True, False]


def test_add_mistakes_include_dropped_carries():
    rows = preference_pairs("add", "test")
    assert any(
        "+0=" in r["rejected"][0]["content"] and "+1=" in r["chosen"][0]["content"] for r in rows
    )


def test_every_causal_lm_gets_preference_accuracy(base_ckpt):
    m = evaluate_checkpoint(base_ckpt, ["reverse"], n=50, with_perplexity=False)
    # the base was pretrained on reverse: it already prefers the right reversal
    assert m["eval.reverse.preference_accuracy"] >= 0.8
