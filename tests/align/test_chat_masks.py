"""Assistant-only loss with a model's own chat template: the built-in ChatML model
(``builtin:tiny-chatml``, no ``{% generation %}`` markers) trains on its answers only, through the
real TRL trainer, and keeps its template."""

import re
from pathlib import Path

import pytest

from align.chat_masks import POLM, TEMPLATE, TRL, mask_source, tokenize_with_masks
from align.sft import SFTSettings, build_trainer
from polm.errors import PolmError
from polm.importer import import_model
from polm.loading import load_tokenizer
from polm.tokenizer import CHATML_TEMPLATE, IM_END
from tests import helpers

CHAT = [*helpers.CHAT_TURNS, {"role": "assistant", "content": "=> 12"}]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return import_model("builtin:tiny-chatml", tmp_path_factory.mktemp("chatml") / "base")


def _assistant_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_each_way_is_chosen_for_its_template(chatml, base_ckpt):
    import trl

    tok = load_tokenizer(chatml.path)
    assert tok.chat_template == CHATML_TEMPLATE and mask_source(tok) == POLM
    assert mask_source(load_tokenizer(base_ckpt.path)) == TEMPLATE  # polm's built-in template
    qwen = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    tok.chat_template = qwen.read_text()  # a template TRL has a training version of
    assert mask_source(tok) == TRL


def test_polm_masks_cover_the_answers_and_their_end_of_turn_only(chatml):
    tok = load_tokenizer(chatml.path)
    enc = tokenize_with_masks(tok, CHAT)
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert _assistant_text(tok, enc["input_ids"], enc["assistant_masks"]) == (
        f"=> 46{IM_END}=> 12{IM_END}"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_way_out(chatml):
    tok = load_tokenizer(chatml.path)
    # renders each turn differently once it is no longer the last: no prefix to diff against
    tok.chat_template = (
        "{%- for m in messages -%}{%- if loop.last -%}LAST {% endif -%}"
        "{{- m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )
    with pytest.raises(PolmError, match="generation %} markers"):
        tokenize_with_masks(tok, CHAT)


@pytest.mark.slow
def test_sft_on_a_chatml_model_puts_the_loss_on_the_answers_only(chatml, tmp_path):
    """The real SFTTrainer's labels are the answers (with ``<|im_end|>``) and nothing of the
    system or user turns, and its loss is the cross-entropy over those tokens alone."""
    import torch

    s = SFTSettings(task="add", n_train=64, max_steps=2, per_device_train_batch_size=4)
    trainer, tok, metrics = build_trainer(chatml, s, tmp_path / "sft")
    assert metrics == {"train.assistant_mask": POLM}
    rows = trainer.train_dataset
    for row in rows.select(range(8)):
        ids, labels = row["input_ids"], row["labels"]
        learned = tok.decode([t for t in labels if t != -100])
        # exactly one scratchpad answer and its end of turn: "7+8+0=15 ... => 525<|im_end|>"
        assert re.fullmatch(rf"[0-9+= ]+=> \d+{re.escape(IM_END)}", learned), learned
        # everything before the answer (the user's question and the headers) is masked
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        assert all(t == -100 for t in labels[:first])

    batch = trainer.data_collator([{k: rows[0][k] for k in ("input_ids", "labels")}])
    model = trainer.model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, by_hand, atol=1e-5), (out.loss, by_hand)
    everything = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:])
    assert not torch.allclose(out.loss, everything, atol=1e-3)  # the user turns would change it


def test_a_chatml_sft_checkpoint_records_the_way_and_keeps_its_template(chatml_sft):
    assert chatml_sft.manifest.metrics["train.assistant_mask"] == POLM
    tok = load_tokenizer(chatml_sft.path)
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == IM_END
