"""A training stage killed after a saved step resumes from it and gives the uninterrupted run's
losses (rtol 1e-5) and weights. The kill is real: SIGKILL to the `polm` process group."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from polm.checkpoint import MANIFEST, Checkpoint
from polm.training import SAVED_MARKER, TRAIN_LOG
from tests.helpers import polm_cli

STAGES = {
    "sft": ["task=add", "max_steps=24", "per_device_train_batch_size=8"],
    "dpo": ["task=add", "max_steps=16", "per_device_train_batch_size=8", "learning_rate=3e-4"],
}
COMMON = ["save_steps=4", "logging_steps=1"]


def _args(stage, base, out, extra):
    sets = [a for kv in [*STAGES[stage], *COMMON, *extra] for a in ("--set", kv)]
    return ["align", stage, "--from", base, "--out", out, *sets]


def _losses(ckpt_dir):
    log = json.loads((ckpt_dir / TRAIN_LOG).read_text())
    return {h["step"]: h["loss"] for h in log if "loss" in h}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_killed_stage_resumes_with_identical_losses(stage, base_ckpt, tmp_path):
    whole = polm_cli(*_args(stage, base_ckpt.path, tmp_path / "whole", []))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "polm.cli", *map(str, _args(stage, base_ckpt.path, out, []))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TQDM_DISABLE": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(f".resumed.resume-*/checkpoint-*/{SAVED_MARKER}")):
        assert proc.poll() is None, "the stage ended before a step was saved"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists(), "killed too late: the stage had already finished"

    again = polm_cli(*_args(stage, base_ckpt.path, out, []))
    assert again.returncode == 0, again.stderr
    metrics = Checkpoint.open(out).manifest.metrics
    assert metrics["train.resumed_from_step"] >= 4
    assert not list(tmp_path.glob(".resumed.*")), "saved steps are removed once the stage is done"

    expected, got = _losses(tmp_path / "whole"), _losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, len(expected) + 1))
    assert got == pytest.approx(expected, rel=1e-5)
    w_expected, w_got = (load_file(d / "model.safetensors") for d in (tmp_path / "whole", out))
    for name, tensor in w_expected.items():
        assert w_got[name].allclose(tensor, rtol=1e-5, atol=1e-7), name


def test_changed_settings_do_not_resume(base_ckpt, tmp_path):
    """Saved steps belong to one set of inputs and settings; a change starts over."""
    first = polm_cli(*_args("sft", base_ckpt.path, tmp_path / "a", ["max_steps=4"]))
    assert first.returncode == 0, first.stderr
    stale = tmp_path / ".b.resume-0000000000000000" / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / SAVED_MARKER).touch()
    second = polm_cli(*_args("sft", base_ckpt.path, tmp_path / "b", ["max_steps=4"]))
    assert second.returncode == 0, second.stderr
    assert "train.resumed_from_step" not in Checkpoint.open(tmp_path / "b").manifest.metrics
    assert not stale.exists()
