"""optimize.distill with TRL's GKD trainer: the loss on its own (against TRL's and the
definitions), students derived from the teacher, wrong inputs refused before loading, and a
half-depth student brought back by distillation on prompts alone."""

import json
import math
import shutil

import pytest
import torch
from pydantic import ValidationError

from optimize.distill import (
    DistillSettings,
    _import_gkd,
    build_dataset,
    derive_student,
    distill_loss,
    run,
)
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.loading import load_model
from tests.helpers import polm_cli

torch.manual_seed(0)
S, T = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)


def _kl(p_log, q_log):  # KL(p || q) per position
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_forward_and_reverse_kl_match_their_definitions():
    s, t = S.log_softmax(-1), T.log_softmax(-1)
    assert torch.allclose(distill_loss(S, T, MASK, "forward_kl"), _kl(t, s)[MASK].mean())
    assert torch.allclose(distill_loss(S, T, MASK, "reverse_kl"), _kl(s, t)[MASK].mean())
    assert not torch.allclose(
        distill_loss(S, T, MASK, "forward_kl"), distill_loss(S, T, MASK, "reverse_kl")
    )
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert distill_loss(S, S.clone(), MASK, kind).abs() < 1e-6  # zero at the teacher


def test_jsd_equals_trls_generalized_jsd_and_stays_below_log_2():
    GKDTrainer = _import_gkd().GKDTrainer
    labels = torch.where(MASK, 1, -100)
    for beta in (0.1, 0.5, 0.9):
        ours = distill_loss(S, T, MASK, "jsd", beta=beta)
        trl = GKDTrainer.generalized_jsd_loss(S, T, labels=labels, beta=beta)
        assert torch.allclose(ours, trl, atol=1e-6), (beta, ours, trl)
    assert distill_loss(S * 50, -T * 50, MASK, "jsd", beta=0.5) <= math.log(2) + 1e-5


def test_temperature_softens_and_is_scaled_by_its_square():
    t2 = distill_loss(S, T, MASK, temperature=2.0)
    assert torch.allclose(t2, 4 * distill_loss(S / 2, T / 2, MASK))
    grad = torch.zeros_like(S, requires_grad=True)
    distill_loss(S + grad, T, MASK).backward()
    assert grad.grad[~MASK].abs().max() == 0 and grad.grad[MASK].abs().max() > 0


def test_every_other_layer_student_keeps_the_teachers_weights(base_ckpt):
    teacher, _ = load_model(base_ckpt)
    student = derive_student(teacher, DistillSettings(task="add", student_layers="every_other"))
    n = teacher.config.num_hidden_layers
    assert student.config.num_hidden_layers == len(range(0, n, 2))
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(range(0, n, 2)):
        for key in [k for k in s if f"layers.{new}." in k]:
            assert torch.equal(s[key], t[key.replace(f"layers.{new}.", f"layers.{old}.")]), key
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    out = student.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    narrow = derive_student(
        teacher, DistillSettings(task="add", student_config={"intermediate_size": 64})
    )
    assert narrow.config.intermediate_size == 64
    assert narrow.config.vocab_size == teacher.config.vocab_size
    with pytest.raises(PolmError, match="distinct layers"):
        derive_student(teacher, DistillSettings(task="add", student_layers=[0, 0]))
    with pytest.raises(PolmError, match="does not have"):
        derive_student(teacher, DistillSettings(task="add", student_config={"widht": 3}))


def test_prompts_alone_modes_never_show_the_reference_answers():
    seq = build_dataset(DistillSettings(task="add", seq_kd=True, n_train=8))
    assert all(row["messages"][-1] == {"role": "assistant", "content": ""} for row in seq)
    on = build_dataset(DistillSettings(task="add", lmbda=1.0, n_train=8))
    assert all(row["messages"][-1]["content"] == "" for row in on)
    off = build_dataset(DistillSettings(task="add", n_train=8))
    assert all("=>" in row["messages"][-1]["content"] for row in off)


def test_settings_and_inputs_are_checked_before_loading(base_ckpt, tmp_path):
    with pytest.raises(ValidationError, match="label_weight"):
        DistillSettings(task="add", lmbda=1.0, label_weight=0.5)
    with pytest.raises(ValidationError, match="not both"):
        DistillSettings(task="add", student_layers="every_other", student_config={"x": 1})
    with pytest.raises(ValidationError, match="loss"):
        DistillSettings(task="add", loss="kl")
    with pytest.raises(PolmError, match="derive it from the teacher"):
        run([base_ckpt], DistillSettings(task="add"), tmp_path / "a")
    # a wrong format, and a student with another vocabulary: refused without reading weights
    bad = tmp_path / "adapter"
    shutil.copytree(base_ckpt.path, bad)
    manifest = json.loads((bad / "polm.json").read_text())
    (bad / "polm.json").write_text(json.dumps({**manifest, "format": "peft-adapter"}))
    (bad / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(PolmError, match="expects a checkpoint of format 'hf'"):
        run([Checkpoint.open(bad)], DistillSettings(task="add", student_layers=[0]), tmp_path / "b")
    other = tmp_path / "other"
    shutil.copytree(base_ckpt.path, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 7}))
    (other / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(PolmError, match="one vocabulary"):
        run([base_ckpt, Checkpoint.open(other)], DistillSettings(task="add"), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_on_policy_and_jsd_run_from_the_cli(base_ckpt, tmp_path):
    out = tmp_path / "student"
    r = polm_cli(
        "optimize", "distill", "--from", base_ckpt.path, "--out", out,
        "--set", "task=reverse", "--set", "student_layers=[0,1]", "--set", "loss=jsd",
        "--set", "lmbda=0.5", "--set", "max_steps=4", "--set", "max_new_tokens=8",
        "--set", "per_device_train_batch_size=4", "--eval", "reverse", "--eval-n", "8",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = Checkpoint.open(out)
    assert ckpt.stage == "optimize.distill" and ckpt.format == "hf"
    assert ckpt.manifest.metrics["distill.student_layers"] == 2
    assert ckpt.manifest.metrics["train.steps"] == 4
    assert ckpt.manifest.metrics["eval.reverse.n"] == 8 and "eval.reverse.accuracy" in r.stdout
    model, _ = load_model(ckpt)
    assert model.config.num_hidden_layers == 2


def test_a_student_distils_from_the_teachers_own_task_on_prompts_alone(add_sft, tmp_path):
    """No task given: the teacher's own, from its manifest (the 200-step calibration, a
    half-depth student reaching the teacher: bench/calibrations/test_distill.py)."""
    settings = DistillSettings(
        student_layers="every_other",
        seq_kd=True,  # the teacher's greedy answers: the dataset's answers are never seen
        sampling_temperature=0,
        max_steps=12,
        logging_steps=2,
        learning_rate=3e-3,
    )
    student = run([add_sft], settings, tmp_path / "student")
    m = student.manifest.metrics
    assert student.manifest.settings["task"] == "add"
    assert m["data.from_lineage"].startswith("task add from align.sft")
    teacher = sum(p.numel() for p in load_model(add_sft)[0].parameters())
    assert m["params"] < 0.75 * teacher, (m["params"], teacher)
    assert m["train.last_loss"] < m["train.first_loss"], m
    assert load_model(student)[0].config.num_hidden_layers == 2
