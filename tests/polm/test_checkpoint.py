import json
import shutil

import pytest

from polm.checkpoint import MANIFEST, Checkpoint, content_hash, lineage, staging
from polm.errors import PolmError


def _write(out, text="w", parents=()):
    with staging(out) as st:
        (st.dir / "model.safetensors").write_text(text)
        return st.commit(
            stage="test.stage",
            format="hf",
            settings={"x": 1},
            parents=parents,
            seed=7,
            metrics={"m": 1.0},
        )


def test_commit_writes_a_whole_checkpoint_with_manifest(tmp_path):
    ckpt = _write(tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m["stage"] == "test.stage" and m["format"] == "hf" and m["seed"] == 7
    assert m["content_hash"] == content_hash(tmp_path / "a")
    assert m["versions"]["torch"] and m["metrics"]["size_bytes"] == 1
    assert Checkpoint.open(ckpt.path).manifest.settings == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path):
    _write(tmp_path / "a", "old")
    with pytest.raises(RuntimeError):
        with staging(tmp_path / "a") as st:
            (st.dir / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (tmp_path / "a" / "model.safetensors").read_text() == "old"


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_text("x")
    with pytest.raises(PolmError, match="no polm.json"):
        Checkpoint.open(tmp_path / "half")
    (tmp_path / "half" / MANIFEST).write_text("{not json")
    with pytest.raises(PolmError, match="not a valid polm manifest"):
        Checkpoint.open(tmp_path / "half")


def test_content_hash_tracks_content_and_names(tmp_path):
    a, b = _write(tmp_path / "a", "1"), _write(tmp_path / "b", "1")
    c = _write(tmp_path / "c", "2")
    assert a.manifest.content_hash == b.manifest.content_hash != c.manifest.content_hash
    (tmp_path / "a" / "model.safetensors").write_text("tampered")
    with pytest.raises(PolmError, match="modified"):
        Checkpoint.open(tmp_path / "a").verify()


def test_lineage_walks_parents_and_reports_missing_ones(tmp_path):
    a, b = _write(tmp_path / "a", "1"), _write(tmp_path / "b", "2")
    child = _write(tmp_path / "child", "3", parents=[a, b])
    assert [p.content_hash for p in child.manifest.parents] == [
        a.manifest.content_hash,
        b.manifest.content_hash,
    ]
    grand = _write(tmp_path / "grand", "4", parents=[child])
    nodes = lineage(grand)
    assert [d for d, _ in nodes] == [0, 1, 2, 2]
    _write(tmp_path / "b", "rewritten")  # replaced since: listed from the child's record
    assert not isinstance(lineage(grand)[-1][1], Checkpoint)
    shutil.rmtree(tmp_path / "a")
    assert not isinstance(lineage(grand)[-2][1], Checkpoint)


def test_wrong_format_is_refused_with_the_expected_one(tmp_path):
    ckpt = _write(tmp_path / "a")
    ckpt.manifest.format = "gptq"
    with pytest.raises(PolmError, match="expects a checkpoint of format 'hf'.*'gptq'"):
        ckpt.require_format("hf", stage="align.sft")
