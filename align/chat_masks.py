"""Assistant-only loss for any chat template, with or without ``{% generation %}`` markers.

TRL masks the loss to the assistant's tokens through transformers' ``{% generation %}``
markers. polm's built-in template has them; most models' own templates (ChatML, Llama 3,
Gemma) do not. Three ways, tried in this order, and the one taken is recorded
(``train.assistant_mask`` in the manifest):

- ``template``: the template has the markers; TRL uses them.
- ``trl``: TRL knows a training version of this exact template
  (``trl.chat_template_utils.get_training_chat_template``: Qwen, Llama 3, Gemma, Phi, ...) and
  swaps it in while it tokenizes.
- ``polm``: for any other template, polm finds the assistant's text by rendering the
  conversation up to each assistant turn (with the generation prompt) and through it: what
  the second adds to the first is the assistant's answer, up to and including its end-of-turn
  token. It needs a template that renders a conversation's prefix as a prefix of the whole
  (every chat template that serves generation does), and a fast tokenizer (character offsets).
  The data set is tokenized here, with an ``assistant_masks`` column TRL turns into labels.

The model's own template is what is saved and exported either way: nothing here changes it.
"""

from __future__ import annotations

from polm.errors import PolmError

TEMPLATE, TRL, POLM = "template", "trl", "polm"
DESCRIPTIONS = {
    TEMPLATE: "the chat template's {% generation %} markers",
    TRL: "TRL's training version of the chat template",
    POLM: "polm (the template has no {% generation %} markers: rendered turn by turn)",
}


def _template(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: the default one is what chat uses
        template = template.get("default")
    if not template:
        raise PolmError(
            "assistant_only_loss needs a chat template, and this tokenizer has none; set "
            "assistant_only_loss: false, or give the model a chat template."
        )
    return template


def mask_source(tokenizer) -> str:
    """Which of the three ways masks the assistant's tokens for this tokenizer's template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(_template(tokenizer)):
        return TEMPLATE
    try:
        return TRL if get_training_chat_template(tokenizer) is not None else TEMPLATE
    except ValueError:  # TRL: "patching is not supported for this template"
        return POLM


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers (each with
    its end-of-turn token, without what the template writes after it)."""
    text = _render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise PolmError(
                "assistant_only_loss: this chat template does not render the start of a "
                f"conversation as the start of the whole (at message {i}), so polm cannot find "
                "the assistant's tokens; add {% generation %} markers around the assistant's "
                "content in the template, or set assistant_only_loss: false."
            )
        start, end = len(before), len(through)
        turn = text[start:end]
        cut = turn.rfind(eos) if eos else -1
        end = start + (cut + len(eos) if cut >= 0 else len(turn.rstrip()))
        spans.append((start, end))
    return text, spans


def tokenize_with_masks(tokenizer, messages: list[dict]) -> dict:
    """``input_ids`` and ``assistant_masks`` (1 on the assistant's tokens) of a conversation,
    tokenized as TRL tokenizes a rendered chat (no special tokens added)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PolmError(
            "assistant_only_loss with a template that has no {% generation %} markers needs a "
            "fast tokenizer (tokenizer.json) for character offsets; this one is slow."
        )
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def tokenize_dataset(tokenizer, dataset):
    """A ``messages`` data set tokenized with assistant masks (the ``polm`` way)."""

    def one(example, idx):
        out = tokenize_with_masks(tokenizer, example["messages"])
        if 1 not in out["assistant_masks"]:
            raise PolmError(
                f"assistant_only_loss: training example {idx} has no assistant answer to learn "
                "from; drop it, or set assistant_only_loss: false."
            )
        return out

    return dataset.map(one, with_indices=True, remove_columns=dataset.column_names)
