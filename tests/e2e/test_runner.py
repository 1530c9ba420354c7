"""Whole recipes through the real `polm run`: skipping, re-running, and surviving SIGKILL."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from polm.checkpoint import MANIFEST, Checkpoint
from tests.helpers import REPO, polm_cli

pytestmark = pytest.mark.e2e


def _recipe(tmp_path, sft_steps=12, dpo_like_steps=8, name="e2e"):
    raw = {
        "name": name,
        "seed": 0,
        "models": {"base": "builtin:tiny-base"},
        "eval": ["add"],
        "stages": {
            "sft": {
                "uses": "align.sft",
                "from": "base",
                "with": {"task": "add", "max_steps": sft_steps},
            },
            "more": {
                "uses": "align.sft",
                "from": "sft",
                "with": {"task": "add", "max_steps": dpo_like_steps},
            },
            "side": {
                "uses": "align.sft",
                "from": "base",
                "with": {"task": "reverse", "max_steps": 4},
            },
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(recipe, workdir):
    proc = polm_cli("run", recipe, "--workdir", workdir, "--eval-n", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _statuses(workdir):
    report = json.loads((workdir / "report.json").read_text())
    return {row["id"]: row["status"] for row in report["stages"]}


def test_rerun_skips_and_a_change_reruns_only_descendants(tmp_path):
    recipe, work = _recipe(tmp_path), tmp_path / "run"
    first = _run(recipe, work)
    assert _statuses(work) == {"base": "ran", "sft": "ran", "more": "ran", "side": "ran"}
    assert "polm run e2e" in first.stdout and "add acc" in first.stdout
    for sid in ("sft", "more", "side"):
        m = Checkpoint.open(work / sid).manifest
        assert "eval.add.accuracy" in m.metrics and m.input_hash

    _run(recipe, work)
    assert set(_statuses(work).values()) == {"cached"}

    _run(_recipe(tmp_path, sft_steps=13), work)
    assert _statuses(work) == {"base": "cached", "sft": "ran", "more": "ran", "side": "cached"}
    lineage = polm_cli("lineage", work / "more")
    assert lineage.returncode == 0 and lineage.stdout.count("\n") == 3
    report = polm_cli("report", work)
    assert report.returncode == 0 and all(s in report.stdout for s in ("sft", "more", "side"))
    inspect = polm_cli("inspect", work / "more", "--json")
    assert json.loads(inspect.stdout)["parents"][0]["path"] == str(work / "sft")


def test_sigkill_mid_stage_then_rerun_completes(tmp_path):
    recipe, work = _recipe(tmp_path, sft_steps=400, name="killed"), tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polm.cli",
            "run",
            str(recipe),
            "--workdir",
            str(work),
            "--eval-n",
            "16",
            "-v",  # the trainer's log lines on stdout tell when training is under way
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    # wait until the sft stage has logged a training loss, then kill the whole process group
    for line in proc.stdout:
        if "'loss'" in line:
            break
    else:
        pytest.fail("polm run ended before it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "sft" / MANIFEST).exists()
    # the stage's scratch space is left, under a name no one takes as a stage output
    assert list(work.glob(".sft.*"))

    # a half checkpoint in place of "sft" (no manifest) must not be used as an input either
    (work / "sft").mkdir()
    (work / "sft" / "model.safetensors").write_bytes(b"half")
    _run(_recipe(tmp_path, sft_steps=20, name="killed"), work)
    assert _statuses(work)["sft"] == "ran"
    assert Checkpoint.open(work / "sft").manifest.metrics["train.steps"] == 20
    assert not list(work.glob(".sft.*"))


def test_rlhf_recipe_chains_sft_reward_ppo_and_grpo(tmp_path):
    """The shape of recipes/rlhf.yaml, shrunk: sft -> reward -> ppo and sft -> grpo."""
    raw = yaml.safe_load((REPO / "recipes" / "rlhf.yaml").read_text())
    shrink = {
        "sft": {"max_steps": 20},
        "sft_strong": {"max_steps": 20},
        "reward": {"max_steps": 10},
        "ppo": {"max_steps": 3, "eval_prompts": 8, "per_device_train_batch_size": 8},
        "grpo": {"max_steps": 2, "per_device_train_batch_size": 8},
        "rlaif": {"n_train": 32, "max_steps": 2},
    }
    for sid, overrides in shrink.items():
        raw["stages"][sid]["with"].update(overrides)
    recipe = tmp_path / "rlhf.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    work = tmp_path / "run"
    _run(recipe, work)
    assert set(_statuses(work).values()) == {"ran"}
    ppo = Checkpoint.open(work / "ppo").manifest
    assert [p.stage for p in ppo.parents] == ["align.sft", "align.reward"]
    assert ppo.metrics["train.reward_source"] == "model" and "eval.add.accuracy" in ppo.metrics
    assert Checkpoint.open(work / "grpo").manifest.parents[0].path == str(work / "sft")
    assert (work / "rlaif" / "rlaif_pairs.jsonl").is_file()


@pytest.mark.parametrize("name", ["merge", "moe"])
def test_merge_recipes_run_end_to_end(name, tmp_path):
    """recipes/merge.yaml and recipes/moe.yaml as shipped but for training steps: every stage
    runs, the merges record all their parents and the report has every stage's accuracy."""
    raw = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    for stage in raw["stages"].values():
        if stage["uses"] == "align.sft":
            stage["with"]["max_steps"] = 4
            stage["with"].pop("n_train", None)  # 4 steps draw from 128 examples, not 20,000
        if stage["uses"] == "merge.moe":
            stage["with"].update(router_fit_steps=5, prompts_per_expert=8, routing_n=8)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    work = tmp_path / "run"
    _run(recipe, work)
    assert set(_statuses(work).values()) == {"ran"}
    report = json.loads((work / "report.json").read_text())
    want = {f"eval.{task}.accuracy" for task in raw["eval"]}
    assert "eval.add.accuracy" in want and len(want) == 2
    for row in report["stages"]:
        assert want <= set(row["metrics"]), row["id"]
    merges = [(sid, s) for sid, s in raw["stages"].items() if s["uses"].startswith("merge.")]
    assert merges
    rows = {row["id"]: row["metrics"] for row in report["stages"]}
    for sid, stage in merges:
        parents = {p.path for p in Checkpoint.open(work / sid).manifest.parents}
        named = {str(work / "models" / f) if f == "base" else str(work / f) for f in stage["from"]}
        assert parents == named, sid
        # the merge beside its inputs and their base, in its manifest and the report
        m, experts = rows[sid], [f for f in stage["from"] if f != "base"]
        for task in raw["eval"]:
            key = f"eval.{task}.accuracy"
            for f in experts:
                assert m[f"merge.input.{f}.{task}.accuracy"] == rows[f][key], (sid, f)
            assert m[f"merge.base.{task}.accuracy"] == rows["base"][key], sid
            best, start = max(rows[f][key] for f in experts), rows["base"][key]
            if best > start:
                kept = (m[key] - start) / (best - start)
                assert m[f"merge.gain_kept.{task}"] == pytest.approx(kept, abs=1e-4), sid
            else:
                assert f"merge.gain_kept.{task}" not in m, sid
