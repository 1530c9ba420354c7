"""Ollama ``Modelfile`` for a GGUF file: ``FROM``, a ``TEMPLATE`` in Ollama's Go-template
syntax, and ``PARAMETER stop`` for the end-of-turn tokens.

Ollama's templates are Go templates, not Jinja, and no library translates one into the other.
The template is written here for the chat formats polm knows (its own built-in one, ChatML,
Gemma, Llama 3), recognised by their markers in the file's Jinja template; for any other,
the Modelfile has no ``TEMPLATE`` and Ollama falls back to its own reading of the file's
``tokenizer.chat_template``.
"""

from __future__ import annotations

# (marker in the Jinja template, Go template with {bos} / {eos} filled in, extra stop strings)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "chatml": (
        "<|im_start|>",
        "{bos}{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}\n{{{{ .Content }}}}<|im_end|>\n"
        "{{{{ end }}}}<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    "llama3": (
        "<|start_header_id|>",
        "{bos}{{{{- range .Messages }}}}<|start_header_id|>{{{{ .Role }}}}<|end_header_id|>\n\n"
        "{{{{ .Content }}}}<|eot_id|>{{{{ end }}}}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
    "gemma": (
        "<start_of_turn>",
        "{bos}{{{{- range .Messages }}}}<start_of_turn>"
        '{{{{ if eq .Role "assistant" }}}}model{{{{ else }}}}{{{{ .Role }}}}{{{{ end }}}}\n'
        "{{{{ .Content }}}}<end_of_turn>\n{{{{ end }}}}<start_of_turn>model\n",
        ("<end_of_turn>",),
    ),
    # polm's built-in template (polm.tokenizer.CHAT_TEMPLATE): <|role|>\n content eos \n
    "polm": (
        "'<|' + message['role'] + '|>",
        "{bos}{{{{- range .Messages }}}}<|{{{{ .Role }}}}|>\n{{{{ .Content }}}}{eos}\n"
        "{{{{ end }}}}<|assistant|>\n",
        (),
    ),
}


def family(template: str | None) -> str | None:
    """Which known chat format a Jinja chat template writes, if any."""
    for name, (marker, _, _) in FAMILIES.items():
        if template and marker in template:
            return name
    return None


def modelfile(
    source: str, meta: dict, bos: str = "", eos: str = "", adapter: str | None = None
) -> str:
    """A Modelfile for the GGUF file at ``source`` (as ``FROM`` reads it), from the file's
    metadata (``llama_cpp.Llama.metadata``) and its bos/eos token texts; ``adapter``: a LoRA
    adapter GGUF applied on it."""
    template = meta.get("tokenizer.chat_template")
    name = family(template)
    # the template's own bos, unless llama.cpp adds one to every prompt already
    adds_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    lead = bos if (template and "bos_token" in template and not adds_bos) else ""
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this directory)", f"FROM {source}"]
    if adapter:  # a LoRA adapter GGUF, applied on FROM's model
        lines.append(f"ADAPTER {adapter}")
    if name:
        _, go, stops = FAMILIES[name]
        lines.append(f'TEMPLATE """{go.format(bos=lead, eos=eos)}"""')
    else:
        lines.append("# no TEMPLATE: Ollama reads the file's own chat template")
    for stop in dict.fromkeys([eos, *(FAMILIES[name][2] if name else ())]):
        if stop:
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
