"""optimize.prune on the add SFT: Wanda and magnitude masks, unstructured and 2:4, the sparsity
the manifest records read back from the weights, and recovery by distillation from the dense
parent raising accuracy while every pruned weight stays zero."""

import pytest
import torch
from safetensors.torch import load_file

from optimize.prune import PruneSettings, mask_for, prunable
from optimize.prune import run as prune
from polm.checkpoint import Checkpoint
from polm.evaluate import evaluate_checkpoint
from polm.loading import load_model

pytestmark = pytest.mark.slow


def zeros(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Each pruned layer's zero pattern, read from the written weights."""
    w = load_file(ckpt.path / "model.safetensors")
    model, _ = load_model(ckpt)
    return {n: w[f"{n}.weight"] == 0 for group in prunable(model) for n in group}


def test_wanda_keeps_the_weights_that_meet_large_inputs():
    """A weight's score is |w| times its input feature's norm: small weights on a loud feature
    outrank larger ones on quiet features, which magnitude alone would keep instead."""
    w = torch.tensor([[0.1, 0.5, 0.4, 0.3]])
    norm = torch.tensor([100.0, 1.0, 1.0, 1.0])
    s = PruneSettings(task="add", sparsity=0.5)
    assert mask_for(w, w.abs() * norm, s).tolist() == [[True, True, False, False]]
    assert mask_for(w, w.abs(), s).tolist() == [[False, True, True, False]]
    two_four = PruneSettings(task="add", pattern="2:4")
    assert two_four.target() == 0.5
    assert mask_for(w, w.abs(), two_four).sum() == 2
    with pytest.raises(ValueError, match="N:M"):
        PruneSettings(task="add", pattern="4:2")


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_one_shot_wanda_reaches_its_sparsity_in_every_layer(add_sft, pattern, tmp_path):
    s = PruneSettings(recovery=False, pattern=pattern, sparsity=0.5, eval_n=100)
    out = prune([add_sft], s, tmp_path / "p")
    m = out.manifest.metrics
    pattern_zeros = zeros(out)
    assert set(m["prune.layers"]) == set(pattern_zeros) and len(pattern_zeros) == 7 * 4
    for name, z in pattern_zeros.items():
        assert m["prune.layers"][name] == pytest.approx(float(z.float().mean()))
        if pattern:  # at least 2 of every 4 consecutive weights of a row are zero
            assert (z.reshape(z.shape[0], -1, 4).sum(-1) >= 2).all(), name
        else:  # half of every row
            assert (z.float().mean(1) >= 0.5 - 1 / z.shape[1]).all(), name
    assert m["prune.sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m["prune.pattern"] == (pattern or "unstructured")
    assert "prune.before_recovery.add.accuracy" in m  # the data came from the SFT's lineage
    parent = load_file(add_sft.path / "model.safetensors")
    pruned = load_file(out.path / "model.safetensors")
    assert torch.equal(parent["model.embed_tokens.weight"], pruned["model.embed_tokens.weight"])


def test_recovery_raises_accuracy_and_every_pruned_weight_stays_zero(add_sft, tmp_path):
    one_shot = prune(
        [add_sft], PruneSettings(recovery=False, sparsity=0.7, eval_n=0), tmp_path / "one_shot"
    )
    recovered = prune(
        [add_sft],
        PruneSettings(sparsity=0.7, max_steps=60, learning_rate=1e-3, eval_n=0),
        tmp_path / "recovered",
    )
    assert zeros(one_shot).keys() == zeros(recovered).keys()
    for name, z in zeros(one_shot).items():
        assert torch.equal(zeros(recovered)[name], z), name  # the same pattern, held
    before = evaluate_checkpoint(one_shot, ["add"], n=100)["eval.add.accuracy"]
    after = evaluate_checkpoint(recovered, ["add"], n=100)["eval.add.accuracy"]
    assert after > before + 0.05, (before, after)
