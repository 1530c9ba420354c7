"""The Ollama Modelfile: Go templates for the chat formats polm knows, stop tokens, and no
TEMPLATE (Ollama reads the file's own) for a format it does not."""

from polm.ollama import family, modelfile
from polm.tokenizer import CHAT_TEMPLATE, strip_generation_tags

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
GEMMA = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{% endfor %}"


def test_known_formats_get_a_go_template_and_their_stop_tokens():
    assert (
        family(CHATML) == "chatml" and family(GEMMA) == "gemma" and family(CHAT_TEMPLATE) == "polm"
    )
    text = modelfile("./model.gguf", {"tokenizer.chat_template": CHATML}, eos="<|endoftext|>")
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    meta = {"tokenizer.chat_template": GEMMA, "tokenizer.ggml.add_bos_token": "true"}
    text = modelfile("./m.gguf", meta, bos="<bos>", eos="<eos>")
    assert 'TEMPLATE """{{- range' in text  # llama.cpp adds <bos> itself: not twice
    assert '{{ if eq .Role "assistant" }}model' in text


def test_the_builtin_template_keeps_its_bos_and_eos_and_an_unknown_one_gets_none():
    text = modelfile("./m.gguf", {"tokenizer.chat_template": CHAT_TEMPLATE}, "<|bos|>", "<|end|>")
    assert 'TEMPLATE """<|bos|>{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>' in text
    text = modelfile("./m.gguf", {"tokenizer.chat_template": "{{ messages }}"}, eos="</s>")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and 'PARAMETER stop "</s>"' in text


def test_generation_markers_are_stripped_for_runtimes_that_do_not_know_them():
    plain = strip_generation_tags(CHAT_TEMPLATE)
    assert "generation -%}" not in plain and "endgeneration" not in plain
    assert "add_generation_prompt" in plain  # not a marker
