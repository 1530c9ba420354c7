"""The stage kit (polm.stage): data taken from the lineage, prompts from a task or a file,
left-padded positions, and stages that do not train never importing the trainer code."""

import json
import subprocess
import sys

import pytest
import torch

from polm.checkpoint import staging
from polm.errors import PolmError
from polm.stage import (
    TaskOrDataset,
    left_padded_positions,
    lineage_data,
    load_prompts,
    with_parent_data,
)
from tests.helpers import REPO


def _ckpt(path, stage, settings, parents=()):
    with staging(path) as st:
        (st.dir / "weights.txt").write_text(f"{stage} {json.dumps(settings)}")
        return st.commit(stage=stage, format="hf", settings=settings, parents=list(parents))


class Calibrated(TaskOrDataset):
    data_from_lineage = True


def test_a_merge_takes_each_branchs_nearest_data(tmp_path):
    base = _ckpt(tmp_path / "base", "import", {"source": "builtin:tiny-base"})
    add = _ckpt(tmp_path / "add", "align.sft", {"task": "add"}, [base])
    add_dpo = _ckpt(tmp_path / "dpo", "align.dpo", {"task": "add", "beta": 0.1}, [add])
    cmp = _ckpt(tmp_path / "cmp", "align.sft", {"task": ["compare", "reverse"]}, [base])
    merged = _ckpt(tmp_path / "merged", "merge.mergekit", {"merge_method": "ties"}, [add_dpo, cmp])

    data, sources = lineage_data(merged)
    assert data == {"task": ["add", "compare", "reverse"]}
    assert [c.path for c in sources] == [add_dpo.path, cmp.path]  # not add: dpo is nearer
    assert lineage_data(add_dpo)[0] == {"task": "add"}
    assert lineage_data(base) is None

    s, note = with_parent_data(Calibrated(), merged, "optimize.gptq", "calibration data")
    assert s.task == ["add", "compare", "reverse"] and s.tasks == ["add", "compare", "reverse"]
    assert note["data.from_lineage"].startswith("task ['add', 'compare', 'reverse'] from align.")
    given = Calibrated(task="reverse")
    assert with_parent_data(given, merged, "optimize.gptq", "calibration data") == (given, {})
    with pytest.raises(PolmError, match="optimize.gptq needs calibration data.*records no"):
        with_parent_data(Calibrated(), base, "optimize.gptq", "calibration data")


def test_a_dataset_in_the_lineage_is_taken_too(tmp_path):
    base = _ckpt(tmp_path / "base", "import", {"source": "builtin:tiny-base"})
    sft = _ckpt(tmp_path / "sft", "align.sft", {"task": None, "dataset": "mine.jsonl"}, [base])
    assert lineage_data(sft)[0] == {"dataset": "mine.jsonl"}


def test_task_or_dataset_is_one_of_the_two():
    with pytest.raises(ValueError, match="exactly one"):
        TaskOrDataset()
    with pytest.raises(ValueError, match="not both"):
        Calibrated(task="add", dataset="x.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        TaskOrDataset(task="nope")
    assert Calibrated().tasks == [] and TaskOrDataset(task="add").tasks == ["add"]


def test_prompts_from_tasks_and_files(tmp_path):
    built_in = load_prompts(["add", "reverse"], None, "test", 3)
    assert [p.task for p in built_in] == ["add"] * 3 + ["reverse"] * 3
    assert built_in[0].text == built_in[0].example.prompt
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine = load_prompts(None, str(f))
    assert [p.text for p in mine] == ["hello", "hi"] and mine[0].task is None
    assert load_prompts(None, str(f), "test") == []  # a file has no held-out split of ours


def test_left_padded_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_stages_that_do_not_train_never_import_the_trainer_code():
    code = (
        "import sys\n"
        "import optimize.gptq, optimize.onnx, optimize.onebit, merge.mergekit, merge.lora\n"
        "print('polm.training' in sys.modules, 'trl' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
