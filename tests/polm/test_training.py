"""polm.training: TRL's fused LM head runs in vocabulary-wide tiles on small vocabularies, with
the same bits as TRL's own width, and TRL's setting is put back afterwards."""

import torch
from trl.trainer import utils as trl_utils

from polm.models import tiny_config
from polm.training import logprob_tiles_fit_vocab


def _fused_loss(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), model.model.embed_tokens.weight.grad.clone()


def test_tiles_fit_the_vocabulary_with_the_same_bits_and_are_restored():
    from transformers import AutoModelForCausalLM

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=384))
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(3, 384, (4, 24))

    loss, grad = _fused_loss(model, ids)
    model.zero_grad(set_to_none=True)
    with logprob_tiles_fit_vocab(model):
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 384
        fitted_loss, fitted_grad = _fused_loss(model, ids)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default
    assert torch.equal(loss, fitted_loss) and torch.equal(grad, fitted_grad)


def test_large_vocabularies_keep_trls_width():
    from transformers import AutoModelForCausalLM

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    big = AutoModelForCausalLM.from_config(
        tiny_config(vocab_size=default + 1, hidden_size=16, num_layers=1, num_heads=1)
    )
    with logprob_tiles_fit_vocab(big):
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default


def test_trainer_kwargs_reach_the_trainer_config_and_cannot_shadow_settings(tmp_path):
    import pytest
    from trl import SFTConfig

    from align.ppo import PPOSettings
    from align.sft import SFTSettings
    from polm.errors import PolmError
    from polm.training import trainer_args

    s = SFTSettings(task="add", trainer_kwargs={"max_grad_norm": 0.25, "adam_beta2": 0.99})
    config = SFTConfig(**trainer_args(s, tmp_path))
    assert config.max_grad_norm == 0.25 and config.adam_beta2 == 0.99
    with pytest.raises(ValueError, match="trainer_kwargs sets learning_rate.*set them directly"):
        SFTSettings(task="add", trainer_kwargs={"learning_rate": 1.0})
    with pytest.raises(PolmError, match="trainer_kwargs sets use_cpu, which polm sets itself"):
        trainer_args(SFTSettings(task="add", trainer_kwargs={"use_cpu": False}), tmp_path)
    with pytest.raises(ValueError, match="no trainer for trainer_kwargs"):
        PPOSettings(task="add", trainer_kwargs={"adam_beta2": 0.99})


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_short_bf16_sequences_train_through_the_math_kernel_and_sdpa_is_put_back():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface, AutoModelForCausalLM

    from polm.training import short_sequences_attend_in_math

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=384))
    assert model.config._attn_implementation == "sdpa"
    default = AttentionInterface._global_mapping["sdpa"]
    ids = torch.randint(3, 384, (8, 48))
    fused = _grads(model, ids)
    with sdpa_kernel(SDPBackend.MATH):
        math = _grads(model, ids)
    assert any(not torch.equal(a, b) for a, b in zip(fused, math))  # the kernels differ
    with short_sequences_attend_in_math():
        assert AttentionInterface._global_mapping["sdpa"] is not default
        chosen = _grads(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(chosen, math))  # bit for bit the math kernel
    assert AttentionInterface._global_mapping["sdpa"] is default
    with short_sequences_attend_in_math():  # fp32 keeps SDPA's own choice
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        fp32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(fp32, model.parameters()))
