"""optimize.gguf with llama.cpp's real converter and quantizer, run by real llama.cpp
(llama-cpp-python): f16 answers as torch does on three architectures, q8_0 / q4_0 keep the
accuracy, llama.cpp tokenizes as the HF tokenizer does, the file carries polm's lineage and a
plain chat template, and Ollama gets a Modelfile."""

import json
import random

import pytest

from optimize.gguf import GgufSettings, pre_tokenizer_name, run
from polm.checkpoint import Checkpoint
from polm.errors import PolmError
from polm.evaluate import chat_prompt, evaluate_checkpoint
from polm.llamacpp import GgufLM
from polm.loading import load_tokenizer
from tests.helpers import CHAT_TURNS, shared


def _export(tmp_path_factory, parent, outtype, name, **kw):
    s = GgufSettings(outtype=outtype, **kw)
    return shared(tmp_path_factory, name, lambda out: run([parent], s, out))


@pytest.fixture(scope="module")
def f16(add_sft, tmp_path_factory):
    return _export(tmp_path_factory, add_sft, "f16", "gguf_f16", task="add", parity_n=100)


@pytest.mark.slow
def test_f16_answers_as_torch_and_carries_lineage_template_and_modelfile(f16, add_sft):
    m = f16.manifest.metrics
    assert f16.format == "gguf" and m["gguf.parity.n"] == 100
    assert m["gguf.parity.greedy_match"] >= 0.95, m
    assert m["gguf.parity.token_match"] == 1.0, m
    lm = GgufLM(f16.path)
    meta = lm.llm.metadata
    assert meta["polm.stage"] == "optimize.gguf"
    assert meta["polm.parent.content_hash"] == add_sft.manifest.content_hash
    assert [n["stage"] for n in json.loads(meta["polm.lineage"])][:2] == ["align.sft", "import"]
    assert meta["tokenizer.ggml.pre"] == "starcoder"
    template = meta["tokenizer.chat_template"]
    assert "endgeneration" not in template and "<|assistant|>" in template
    modelfile = (f16.path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    assert 'TEMPLATE """<|bos|>{{- range .Messages }}<|{{ .Role }}|>' in modelfile


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(f16, add_sft):
    rng = random.Random(0)
    pieces = ["12+34", " 7", "  ", "\t", "\n", "héllo", "naïve café", "日本語", "🦙🚀",
              "x=3.14", "'ll", "I've", "--==", "ÅÄÖ", "١٢٣", "ß", "   9  9", "a\u200db",
              "<|user|>"]  # fmt: skip
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(150)]
    tok = load_tokenizer(add_sft.path)
    texts += [chat_prompt(tok, t) for t in texts[:50]]  # with the chat template applied
    lm = GgufLM(f16.path)
    mismatched = [t for t in texts if lm.tokenize(t) != tok(t, add_special_tokens=False).input_ids]
    assert len(texts) == 200 and not mismatched, mismatched[:5]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-mistral"])
def test_f16_answers_as_torch_on_other_architectures(arch, tmp_path):
    from polm.importer import import_model

    base = import_model(f"builtin:{arch}", tmp_path / "base")
    ckpt = run([base], GgufSettings(outtype="f16", task="add", parity_n=100), tmp_path / "gguf")
    m = ckpt.manifest.metrics
    assert m["gguf.parity.greedy_match"] >= 0.95 and m["gguf.parity.token_match"] == 1.0, m
    # llama.cpp runs Mistral's architecture as llama
    assert m["gguf.architecture"] == {"tiny-qwen2": "qwen2", "tiny-mistral": "llama"}[arch]


@pytest.mark.slow
@pytest.mark.parametrize("outtype,keep", [("q8_0", 0.98), ("q4_0", 0.95)])
def test_quantized_ggufs_keep_the_accuracy(outtype, keep, add_sft, tmp_path):
    ckpt = run([add_sft], GgufSettings(outtype=outtype, parity_n=0), tmp_path / outtype)
    ours = evaluate_checkpoint(ckpt, ["add"], n=100)
    torch_side = evaluate_checkpoint(add_sft, ["add"], n=100)
    assert ours["eval.add.accuracy"] >= keep * torch_side["eval.add.accuracy"], (ours, torch_side)
    # the same held-out prose, scored by llama.cpp and by torch (q8_0: 35.10 vs 34.99)
    assert ours["perplexity"] < 1.05 * torch_side["perplexity"], (ours, torch_side)
    assert ckpt.manifest.metrics["bits_per_weight"] < (9 if outtype == "q8_0" else 6)
    file_type = GgufLM(ckpt.path).llm.metadata["general.file_type"]
    assert file_type == {"q8_0": "7", "q4_0": "2"}[outtype]  # llama.cpp's llama_ftype


@pytest.mark.slow
def test_k_quant_export_runs_through_llama_cpps_quantizer(add_sft, tmp_path):
    ckpt = run([add_sft], GgufSettings(outtype="q4_k_m", parity_n=0), tmp_path / "q4km")
    assert not (ckpt.path / "f32.gguf").exists()  # the intermediate is gone
    lm = GgufLM(ckpt.path)
    assert lm.llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert lm.llm.metadata["polm.parent.content_hash"] == add_sft.manifest.content_hash
    assert all("=>" in a for a in lm.greedy(["12+34", "5+7"], 48))


@pytest.mark.slow
def test_a_lora_adapter_exports_as_a_gguf_adapter_that_llama_cpp_applies(base_ckpt, tmp_path):
    from align.sft import SFTSettings
    from align.sft import run as sft

    s = SFTSettings(
        task="add", method="lora", output_format="peft-adapter", learning_rate=5e-3, max_steps=20
    )
    adapter = sft([base_ckpt], s, tmp_path / "adapter")
    ckpt = run([adapter], GgufSettings(outtype="f16", task="add", parity_n=50), tmp_path / "g")
    assert (ckpt.path / "adapter.gguf").is_file() and (ckpt.path / "model.gguf").is_file()
    # llama.cpp's base file with the adapter applied answers as torch's base + adapter does
    assert ckpt.manifest.metrics["gguf.parity.greedy_match"] >= 0.95, ckpt.manifest.metrics
    prompts = ["12+34", "5+7", "103+9", "44+44"]
    with_adapter = GgufLM(ckpt.path).greedy(prompts, 32)
    base_only = GgufLM(ckpt.path / "model.gguf").greedy(prompts, 32)
    assert with_adapter != base_only  # the adapter is what changes the answers
    assert "ADAPTER ./adapter.gguf" in (ckpt.path / "Modelfile").read_text()


@pytest.mark.slow
def test_a_chatml_model_exports_with_its_own_template(chatml_sft, tmp_path):
    """A model whose template has no generation markers keeps that template, byte for byte,
    in the GGUF (rendered by llama.cpp's side as by transformers) and in Ollama's Modelfile."""
    from polm.tokenizer import CHATML_TEMPLATE, IM_END

    ckpt = run([chatml_sft], GgufSettings(outtype="f16", task="add", parity_n=20), tmp_path / "g")
    m = ckpt.manifest.metrics
    assert m["gguf.parity.greedy_match"] >= 0.95 and m["gguf.parity.token_match"] == 1.0, m
    lm = GgufLM(ckpt.path)
    assert lm.llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert lm.eos_text == IM_END
    tok = load_tokenizer(chatml_sft.path)
    assert lm.render(CHAT_TURNS) == tok.apply_chat_template(
        CHAT_TURNS, tokenize=False, add_generation_prompt=True
    )
    modelfile = (ckpt.path / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}" in modelfile and f'PARAMETER stop "{IM_END}"' in modelfile


@pytest.fixture(scope="module")
def gptq4(add_sft, tmp_path_factory):
    from optimize.gptq import GPTQSettings
    from optimize.gptq import run as gptq

    s = GPTQSettings(bits=4, group_size=32, n_calibration=128, task="add")
    return shared(tmp_path_factory, "gptq4_g32", lambda out: gptq([add_sft], s, out))


@pytest.mark.slow
def test_a_gptq_checkpoint_exports_its_own_blocks_as_q4_0(gptq4, tmp_path):
    """GPTQ's codes and scales become the file's q4_0 blocks unchanged (not rounded again), and
    llama.cpp's answers keep the GPTQ model's accuracy."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from optimize.gguf_gptq import _layer

    ckpt = run([gptq4], GgufSettings(outtype="q4_0", task="add", parity_n=50), tmp_path / "g")
    m = ckpt.manifest.metrics
    assert m["gguf.gptq_blocks"] == 4 * 7, m  # every linear layer of tiny-base's 4 blocks
    assert m["gguf.parity.greedy_match"] >= 0.95, m
    tensors = {t.name: t for t in GGUFReader(ckpt.path / "model.gguf").tensors}
    down = tensors["blk.1.ffn_down.weight"]
    with safe_open(gptq4.path / "model.safetensors", "np") as f:
        gptq_weight, _ = _layer(f, "model.layers.1.mlp.down_proj", zero_offset=1)
    ours = dequantize(down.data, down.tensor_type).reshape(gptq_weight.shape)
    assert np.array_equal(ours, gptq_weight)  # bit for bit: the blocks are GPTQ's
    gguf_acc = evaluate_checkpoint(ckpt, ["add"], n=200, with_perplexity=False)
    torch_acc = evaluate_checkpoint(gptq4, ["add"], n=200, with_perplexity=False)
    assert gguf_acc["eval.add.accuracy"] >= 0.98 * torch_acc["eval.add.accuracy"], (
        gguf_acc,
        torch_acc,
    )


def test_a_gptq_checkpoint_that_is_not_q4_0_data_is_refused(gptq4, tmp_path):
    import json
    import shutil

    with pytest.raises(PolmError, match="outtype: q4_0"):
        run([gptq4], GgufSettings(outtype="q8_0"), tmp_path / "x")
    asym = tmp_path / "asym"
    shutil.copytree(gptq4.path, asym)
    config = json.loads((asym / "config.json").read_text())
    config["quantization_config"].update(sym=False, group_size=48)
    (asym / "config.json").write_text(json.dumps(config))
    with pytest.raises(PolmError, match="asymmetric.*group_size 48"):
        run([Checkpoint.open(asym)], GgufSettings(outtype="q4_0"), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_wrong_inputs_and_settings_are_refused(base_ckpt, tmp_path):
    with pytest.raises(ValueError, match="outtype"):
        GgufSettings(outtype="q4_k")
    not_hf = Checkpoint.open(base_ckpt.path)
    not_hf.manifest.format = "onnx"
    with pytest.raises(PolmError, match="hf"):
        run([not_hf], GgufSettings(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PolmError, match="ternary"):  # tq types hold ternary weights only
        run([base_ckpt], GgufSettings(outtype="tq2_0"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PolmError, match="model.gguf"):
        GgufLM(tmp_path)


def test_polm_tokenizer_maps_to_llama_cpps_starcoder_pre_tokenizer(base_ckpt, tmp_path):
    assert pre_tokenizer_name(base_ckpt.path) == "starcoder"
    assert pre_tokenizer_name(tmp_path) is None  # no tokenizer.json: the converter decides
