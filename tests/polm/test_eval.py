import math

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
