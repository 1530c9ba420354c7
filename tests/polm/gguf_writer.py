"""Test support: write a polm Llama checkpoint as an F32 GGUF file, the way llama.cpp's
converter lays it out (q/k rows permuted for its rotary layout, gpt2-style BPE vocabulary),
so the GGUF import path is tested on a file polm made itself instead of a downloaded one."""

import json
from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # inverse of transformers' LlamaTensorProcessor._reverse_permute_weights
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(ckpt_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    tok = json.loads((ckpt_dir / "tokenizer.json").read_text())
    state = load_file(ckpt_dir / "model.safetensors")
    n_layers, n_head, n_kv = (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, piece) for piece, i in vocab]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    w.add_token_types([control if i in added else normal for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        if ".attn_q." in name:
            tensor = _permute(tensor, n_head)
        elif ".attn_k." in name:
            tensor = _permute(tensor, n_kv)
        w.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
