"""Tiny builders for real architectures (Llama, Qwen2, Mistral), for tests and ``tiny-base``.

These are the upstream ``transformers`` model classes with small configs: everything that works
on them (TRL, PEFT, mergekit, GPTQModel, the ONNX builder, vLLM) works as on a full-size model.
"""

from __future__ import annotations

from polm.errors import PolmError

ARCHITECTURES = ("llama", "qwen2", "mistral")


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 384,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    tokenizer=None,
):
    """A small config of ``arch``; special token ids are taken from ``tokenizer`` when given."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10_000.0,
    )
    if tokenizer is not None:
        common.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise PolmError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    """A randomly initialised tiny causal LM of ``arch`` (deterministic for a seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
