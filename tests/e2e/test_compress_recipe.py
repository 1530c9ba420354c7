"""recipes/compress.yaml through the real `polm run`, shrunk to a few training steps: every
stage runs, each format is evaluated, and the summary table shows accuracy, size and bits per
weight side by side."""

import json

import yaml

from polm.checkpoint import Checkpoint
from tests.helpers import REPO, polm_cli

FORMATS = {
    "sft": "hf",
    "distill": "hf",
    "distill_labels": "hf",
    "gptq": "gptq",
    "binary": "onebit",
    "binary_ptq": "onebit",
    "ternary": "onebit",
    "ternary_ptq": "onebit",
    "onnx_int4": "onnx",
}


def test_compress_recipe_runs_end_to_end(tmp_path):
    raw = yaml.safe_load((REPO / "recipes" / "compress.yaml").read_text())
    for stage in raw["stages"].values():
        if "max_steps" in stage["with"]:
            stage["with"]["max_steps"] = 3
        if stage["uses"] == "optimize.gptq":
            stage["with"]["n_calibration"] = 16
        if stage["uses"] == "optimize.onnx":
            stage["with"]["parity_n"] = 8
    recipe = tmp_path / "compress.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    work = tmp_path / "run"
    proc = polm_cli("run", recipe, "--workdir", work, "--eval-n", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    rows = {row["id"]: row for row in report["stages"]}
    assert set(FORMATS) <= set(rows) and all(r["status"] == "ran" for r in rows.values())
    for sid, fmt in FORMATS.items():
        m = rows[sid]["metrics"]
        assert Checkpoint.open(work / sid).format == fmt, sid
        assert "eval.add.accuracy" in m and m["size_bytes"] > 0 and "bits_per_weight" in m, sid
    bits = {sid: rows[sid]["metrics"]["bits_per_weight"] for sid in FORMATS}
    linear = {
        sid: rows[sid]["metrics"]["onebit.linear_bits_per_weight"] for sid in ("binary", "ternary")
    }
    assert linear["binary"] < 1.3 and linear["ternary"] < 2.1, linear
    # the whole file over every weight (the embedding in int8 rows, the norms in bfloat16)
    assert bits["binary"] < 1.7 and bits["ternary"] < 2.2 and bits["gptq"] < 6, bits
    assert 31 < bits["sft"] < 33, bits
    assert "onnx.parity.greedy_match" in rows["onnx_int4"]["metrics"]
    table = proc.stdout
    assert "bits/w" in table and "onnx_int4" in table and "add acc" in table, table
