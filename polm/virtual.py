"""Decoding PEFT models that learned virtual tokens (prompt tuning, P-tuning, prefix tuning)
without PEFT's ``generate`` and forward-with-cache, which lose the virtual tokens with
transformers 5 (PEFT 0.21.2: a P-tuned model that scores 100% of its answer tokens
teacher-forced wrote garbage through both, in ``generate`` and in the server's cached loop).

The virtual tokens go in by hand, in front of the prompt, at the positions training gave them
(positions 0..n-1, the prompt's tokens after them): prompt and P-tuning's as input embeddings,
prefix tuning's as the cache the prompt starts from.

- :func:`generate_kwargs`: the base model and ``generate`` arguments (evaluation, self-refine);
- :class:`VirtualTokenLM`: the model the transformers backend decodes with, step by step with
  its own cache, attention mask and positions, all without the virtual tokens.
"""

from __future__ import annotations

PREFIX = "PREFIX_TUNING"


def learns_virtual_tokens(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def _ones(mask, n):
    import torch

    return torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)


def generate_kwargs(model, enc: dict):
    """``(base model, generate kwargs)`` for ``model`` when it learned virtual tokens, else
    None; ``enc`` holds the left-padded ``input_ids`` and ``attention_mask``. With input
    embeddings ``generate`` returns the new tokens only; with a prefix, the filler ids, the
    prompt and the new tokens."""
    import torch

    if not learns_virtual_tokens(model):
        return None
    config, base = model.active_peft_config, model.get_base_model()
    rows, n = enc["input_ids"].shape[0], config.num_virtual_tokens
    mask = torch.cat([_ones(enc["attention_mask"], n), enc["attention_mask"]], dim=1)
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=rows)
    if config.peft_type == PREFIX:
        # the prefix is the cache's first n positions: stand-in ids for them, never read
        filler = torch.zeros((rows, n), dtype=enc["input_ids"].dtype, device=base.device)
        ids = torch.cat([filler, enc["input_ids"]], dim=1)
        return base, {"input_ids": ids, "attention_mask": mask, "past_key_values": prompt}
    embeds = base.get_input_embeddings()(enc["input_ids"])
    embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
    return base, {"inputs_embeds": embeds, "attention_mask": mask}


def _virtual_token_lm_class():
    import torch
    from torch import nn

    class VirtualTokenLM(nn.Module):
        """A causal LM over a virtual-token PEFT model for step-by-step decoding: the first
        call on an empty cache puts the virtual tokens in front; every call extends the
        caller's attention mask over them and shifts its positions past them; the logits are
        the caller's positions only."""

        def __init__(self, peft_model):
            super().__init__()
            self.peft = peft_model
            self.base = peft_model.get_base_model()
            self.config = self.base.config
            self.generation_config = self.base.generation_config
            self.n = peft_model.active_peft_config.num_virtual_tokens
            self.prefix = peft_model.active_peft_config.peft_type == PREFIX

        @property
        def device(self):
            return self.base.device

        def forward(
            self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kw
        ):
            n, rows = self.n, input_ids.shape[0]
            first = past_key_values is None or past_key_values.get_seq_length() == 0
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if position_ids is None:
                position_ids = attention_mask.long().cumsum(-1)[:, -input_ids.shape[1] :] - 1
            mask = torch.cat([_ones(attention_mask, n), attention_mask], dim=1)
            pos = position_ids + n
            if not first:
                return self.base(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=past_key_values,
                    **kw,
                )
            with torch.no_grad():
                prompt = self.peft.get_prompt(batch_size=rows)
            if self.prefix:  # the prefix's keys and values, then the prompt after them
                for i, layer in enumerate(prompt.layers):
                    past_key_values.update(layer.keys, layer.values, i)
                return self.base(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=past_key_values,
                    **kw,
                )
            embeds = self.base.get_input_embeddings()(input_ids)
            embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
            virtual = torch.arange(n, device=pos.device).expand(rows, n)
            out = self.base(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=torch.cat([virtual, pos], dim=1),
                past_key_values=past_key_values,
                **kw,
            )
            out.logits = out.logits[:, n:]
            return out

    return VirtualTokenLM


def for_decoding(model):
    """``model`` as the transformers backend decodes it: wrapped when it learned virtual
    tokens, else as it is."""
    return _virtual_token_lm_class()(model) if learns_virtual_tokens(model) else model
