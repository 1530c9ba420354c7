import math
from types import SimpleNamespace

import pytest

from polm import evaluate
from polm.evaluate import evaluate_checkpoint


def test_base_model_metrics(base_ckpt):
    m = evaluate_checkpoint(base_ckpt, ["add", "reverse"], n=100)
    # tiny-base was never shown addition in the chat format: that is what SFT teaches
    assert m["eval.add.accuracy"] <= 0.05
    # ... but it was pretrained on the reverse task
    assert m["eval.reverse.accuracy"] >= 0.5
    assert m["eval.add.n"] == 100
    assert 1.0 < m["perplexity"] < 5.0 and math.isfinite(m["perplexity"])
    assert 0.9e6 < m["params"] < 3e6
    assert m["size_bytes"] > 3e6


def test_batches_shrink_with_the_vocabulary_and_the_results_do_not_change(base_ckpt, monkeypatch):
    from polm.loading import load_model
    from polm.preference import preference_pairs

    gemma = SimpleNamespace(config=SimpleNamespace(vocab_size=262_144))  # 1 MiB a position
    assert evaluate.rows_per_batch(gemma, 40, 64) == 2  # 96 MiB of fp32 logits: 80 MiB
    assert evaluate.rows_per_batch(gemma, 4000, 64) == 1
    model, tok = load_model(base_ckpt)
    pairs = preference_pairs("add", "test", 10)
    want = evaluate.perplexity(model, tok, n=20), evaluate.completion_logprobs(model, tok, pairs)
    monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 1)  # one row a forward pass
    got = evaluate.perplexity(model, tok, n=20), evaluate.completion_logprobs(model, tok, pairs)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-4, abs=1e-4)


def test_decoding_stops_at_the_task_answer_length(base_ckpt):
    from polm.loading import load_tokenizer
    from polm.tasks import get_task

    tok = load_tokenizer(base_ckpt.path)
    for task in ("add", "reverse", "compare"):
        longest = max(len(tok(e.answer).input_ids) for e in get_task(task).examples("test"))
        assert longest < evaluate.hf_answer_tokens(tok, task) <= longest + max(8, longest // 4)
    assert evaluate.hf_answer_tokens(tok, "compare") < 16  # was 48 for a one-word answer
