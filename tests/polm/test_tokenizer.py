import json

from polm.importer import BUILTIN_DIR
from polm.tokenizer import build_tokenizer


def test_digits_are_single_tokens_and_roundtrip():
    tok = build_tokenizer()
    text = "ada has 12345 apples."
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("12345")
    assert tok.decode(ids) == text


def test_chat_template_masks_only_the_assistant_turn():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "=> 3"}]
    enc = tok.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "=> 3<|end|>"


def test_tokenizer_is_rebuilt_bit_for_bit():
    shipped = json.loads((BUILTIN_DIR / "tiny-base" / "tokenizer.json").read_text())
    rebuilt = json.loads(build_tokenizer().backend_tokenizer.to_str())
    assert rebuilt["model"] == shipped["model"]
