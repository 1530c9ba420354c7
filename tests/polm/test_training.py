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
