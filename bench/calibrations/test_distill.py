"""Distillation's calibration: a half-depth student distilled on prompts alone for 200 steps
reaches 90% of its teacher (tests/optimize/test_distill.py keeps the short check)."""

from optimize.distill import DistillSettings, derive_student, run
from polm.evaluate import evaluate_checkpoint
from polm.loading import load_model

# at lr 3e-3, measured: 93.8% from a 93.5% teacher (150 steps: 84.6%; AMD EPYC with avx512_bf16);
# on an AVX2-only AMD EPYC (fp32) 68% from a 94% teacher: below the bar, an open finding
DISTILL_STEPS = 200


def test_half_depth_student_distilled_on_prompts_alone_reaches_the_teacher(
    add_sft, tmp_path, record_property
):
    from polm.evaluate import accuracy

    teacher = evaluate_checkpoint(add_sft, ["add"], n=200, with_perplexity=False)
    teacher_model, tokenizer = load_model(add_sft)
    settings = DistillSettings(  # no task: the teacher's own, from its manifest
        student_layers="every_other",
        seq_kd=True,  # the teacher's greedy answers: the dataset's answers are never seen
        sampling_temperature=0,
        max_steps=DISTILL_STEPS,
        learning_rate=3e-3,
    )
    cut = accuracy(derive_student(teacher_model, settings).eval(), tokenizer, "add", 200)
    student = run([add_sft], settings, tmp_path / "student")
    assert student.manifest.settings["task"] == "add"
    assert student.manifest.metrics["data.from_lineage"].startswith("task add from align.sft")
    after = evaluate_checkpoint(student, ["add"], n=200, with_perplexity=False)
    t, c, a = teacher["eval.add.accuracy"], cut["accuracy"], after["eval.add.accuracy"]
    record_property("teacher", t)
    record_property("cut", c)
    record_property("student", a)
    assert a >= 0.9 * t, (t, c, a)
    assert c < 0.5 * t, (t, c, a)  # the cut student alone does not do it
    assert student.manifest.metrics["params"] < 0.75 * teacher["params"]
