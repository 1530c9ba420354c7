"""`polm run` survives SIGKILL at any moment: kill the whole process group at random (seeded)
points in time, re-run after each kill, and check what the design promises.

- No directory that looks like a finished checkpoint without being whole: every stage directory
  that exists opens as a checkpoint and its files match its content hash; anything else is a
  temporary sibling (``.<stage>.*``) or the runner's own files.
- A checkpoint, once there, keeps its bytes: every content hash seen after a kill is the
  uninterrupted run's, and a stage the runner had finished is still there after the next
  kill and re-run.
- A final re-run completes, gives every stage the uninterrupted run's content hash, and leaves
  no temporary sibling behind.

The recipe is small (builtin:tiny-base -> a 30-step SFT on add -> a 10-step SFT on reverse,
evaluated on 8 add examples) so one run takes well under a minute on 2 cores. Kill points are
drawn uniformly over the time the rest of the run is expected to take (from the uninterrupted
run's timings), so they fall in startup, training, writing, evaluation and bookkeeping alike.
A run that ends before its kill (the machine got faster than during the reference run) rescales
the timings, and the next kills go to a fresh run directory.

More kills: ``POLM_KILLS=20`` (default 3); another sequence of kill points:
``POLM_KILL_SEED=N`` (default 0). Example::

    POLM_KILLS=20 POLM_KILL_SEED=7 python -m pytest -q tests/reliability/test_kill.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from polm.checkpoint import MANIFEST, Checkpoint
from polm.training import SAVED_MARKER
from tests.helpers import polm_cli, stop_process_tree

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KILLS = int(os.environ.get("POLM_KILLS", "3"))
SEED = int(os.environ.get("POLM_KILL_SEED", "0"))
MODELS = ("base",)
STAGES = ("sft", "more")
EVAL_N = "8"


def _recipe(path: Path) -> Path:
    raw = {
        "name": "killed",
        "seed": 0,
        "models": {"base": "builtin:tiny-base"},
        "eval": ["add"],
        "stages": {
            "sft": {"uses": "align.sft", "from": "base", "with": {"task": "add", "max_steps": 15}},
            "more": {
                "uses": "align.sft",
                "from": "sft",
                "with": {"task": "reverse", "max_steps": 5},
            },
        },
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage_dirs(work: Path) -> dict[str, Path]:
    return {
        **{m: work / "models" / m for m in MODELS},
        **{s: work / s for s in STAGES},
    }


def _run_to_completion(recipe: Path, work: Path, fresh: bool = False) -> None:
    proc = polm_cli("run", recipe, "--workdir", work, "--eval-n", EVAL_N, fresh=fresh)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _hashes(work: Path) -> dict[str, str]:
    return {sid: Checkpoint.open(d).manifest.content_hash for sid, d in _stage_dirs(work).items()}


def _whole_checkpoints(work: Path) -> dict[str, Checkpoint]:
    """Every stage directory there is, each checked whole; fails on anything half-written or
    unexpected in the run directory."""
    found = {}
    for sid, d in _stage_dirs(work).items():
        if d.exists():
            ckpt = Checkpoint.open(d)  # raises on a directory without a valid manifest
            ckpt.verify()  # raises when the files do not match the manifest's hash
            found[sid] = ckpt
    allowed = {*STAGES, "models", "logs", "report.json", ".lock", "packages"}
    allowed |= {"report.html", "report.md", "report-plots"}  # rendered from report.json
    for parent, names in ((work, STAGES), (work / "models", MODELS)):
        for entry in parent.iterdir() if parent.is_dir() else ():
            if entry.name in allowed | set(MODELS) or entry.name.startswith(
                (".report.json.tmp-", ".report.html.tmp")
            ):
                continue
            assert any(entry.name.startswith(f".{n}.") for n in names), (
                f"unexpected {entry} in the run directory"
            )
    if (work / "report.json").exists():
        json.loads((work / "report.json").read_text())  # whole, or not there at all
    return found


def _start(recipe: Path, work: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "polm.cli", "run", str(recipe), "--workdir", str(work)]
        + ["--eval-n", EVAL_N],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TQDM_DISABLE": "1"},
        start_new_session=True,  # its own process group: the kill reaches every process in it
    )


def _kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the run's whole process group; True if it was still running."""
    running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stop_process_tree(proc)  # anything that left the group, and reap the leader
    return running


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_hashes(tmp_path):
    recipe = _recipe(tmp_path / "recipe.yaml")

    # the uninterrupted run: the hashes to reach, and how long each part takes here
    reference = tmp_path / "reference"
    t0 = time.monotonic()
    _run_to_completion(recipe, reference, fresh=True)  # its timings are the killed runs' (fresh)
    total_s = time.monotonic() - t0
    expected = _hashes(reference)
    stage_s = {
        sid: Checkpoint.open(d).manifest.metrics.get("wall_s", 0)
        for sid, d in _stage_dirs(reference).items()
    }

    rng, fresh = random.Random(SEED), 0
    work = tmp_path / "killed"
    interrupted, finished_before = 0, {}
    for i in range(KILLS):
        done = _whole_checkpoints(work)
        finished = {s for s, c in done.items() if c.manifest.input_hash}
        remaining_s = max(1.0, total_s - sum(stage_s[s] for s in finished))
        delay = rng.uniform(0.02, 0.95) * remaining_s
        proc = _start(recipe, work)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=delay)
            ran_out = time.monotonic() - t0  # the run ended before its kill
        except subprocess.TimeoutExpired:
            ran_out = None
        interrupted += _kill_group(proc)

        after = _whole_checkpoints(work)
        for sid, ckpt in after.items():
            assert ckpt.manifest.content_hash == expected[sid], (
                f"kill {i} at {delay:.1f} s: {sid} has other bytes than the uninterrupted run"
            )
        for sid, content_hash in finished_before.items():
            assert sid in after, f"kill {i}: finished stage {sid} disappeared"
            assert after[sid].manifest.content_hash == content_hash
        finished_before = {
            s: c.manifest.content_hash for s, c in after.items() if c.manifest.input_hash
        }
        if ran_out is not None:
            # the machine runs faster now than during the reference run (other work shared
            # it then): rescale the expected times, and go on in a fresh directory so that the
            # next kills still have a run to interrupt
            scale = ran_out / remaining_s
            total_s *= scale
            stage_s = {sid: t * scale for sid, t in stage_s.items()}
            fresh += 1
            work, finished_before = tmp_path / f"killed-{fresh}", {}
    assert interrupted, "every kill came after the run had ended: nothing was interrupted"

    _run_to_completion(recipe, work)
    _whole_checkpoints(work)
    assert _hashes(work) == expected
    for sid, d in _stage_dirs(work).items():
        assert not list(d.parent.glob(f".{sid}.*")), f"temporary siblings of {sid} left"
        assert (d / MANIFEST).is_file()


def test_a_stage_resumed_from_saved_steps_gives_the_uninterrupted_bytes(base_ckpt, tmp_path):
    """With ``save_steps`` a killed stage resumes; its checkpoint is then the one an
    uninterrupted run writes: the weights byte for byte and the content hash, so that nothing
    downstream re-runs. Its train_log.json differs (transformers and TRL do not save their
    logging accumulators) and is a record outside the content hash, like the manifest."""
    kvs = ("task=add", "max_steps=30", "save_steps=10", "per_device_train_batch_size=8")
    sets = [a for kv in kvs for a in ("--set", kv)]

    def args(out):
        return ["align", "sft", "--from", str(base_ckpt.path), "--out", str(out), *sets]

    whole = polm_cli(*args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "polm.cli", *args(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TQDM_DISABLE": "1"},
        start_new_session=True,
    )
    while not list(tmp_path.glob(f".resumed.resume-*/checkpoint-*/{SAVED_MARKER}")):
        assert proc.poll() is None, "the stage ended before a step was saved"
        time.sleep(0.01)
    assert _kill_group(proc)
    assert not (out / MANIFEST).exists(), "killed too late: the stage had already finished"
    again = polm_cli(*args(out))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = Checkpoint.open(out)
    assert resumed.manifest.metrics["train.resumed_from_step"] >= 10
    want = Checkpoint.open(tmp_path / "whole").manifest.content_hash
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
    assert resumed.manifest.content_hash == want
