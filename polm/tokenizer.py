"""The built-in offline tokenizer: byte-level BPE with single-digit tokens and a chat template.

Digits are always split one per token (as in LLaMA and GPT-4's pre-tokenizers) so that
arithmetic tasks see one token per digit. The BPE merges are learned deterministically from
polm's synthetic corpus, so the tokenizer is rebuilt bit for bit from code; nothing is
downloaded. The chat template wraps assistant turns in ``{% generation %}`` so that TRL's
``assistant_only_loss`` can mask everything but the assistant's answer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, BOS, EOS] + [f"<|{role}|>" for role in ROLES]
VOCAB_SIZE = 384

# End of turn is the tokenizer's eos token, so the same template also serves imported models
# that come without one (GGUF base models, for instance). Tool calls are written as Hermes and
# Qwen 2.5 write them (what vLLM's `hermes` parser and llama.cpp read), each call as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> in the assistant's turn, and a
# tool's result as a user turn inside <tool_response>. The tools themselves go in the system
# turn inside <tools>, one signature a line (`add(a: integer, b: integer) # description`):
# their JSON schemas would not fit the built-in models' 256-token context (this tokenizer
# spends about a token a character on JSON). Chats without tools render as before.
CHAT_TEMPLATE = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- if tools -%}"
    "{{- '<|system|>\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{{- '<tools>\\n' -}}"
    "{%- for tool in tools -%}"
    "{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set params = f['parameters'] if f['parameters'] is defined else {} -%}"
    "{%- set props = params['properties'] if params['properties'] is defined else {} -%}"
    "{{- f['name'] + '(' -}}"
    "{%- for name in props -%}"
    "{%- set spec = props[name] -%}"
    "{{- name + ': ' + (spec['type'] if spec['type'] is defined else 'any') -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ')' -}}"
    "{%- if f['description'] is defined and f['description'] -%}"
    "{{- ' # ' + f['description'] -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{{- '</tools>' + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}"
    "{%- if message['content'] -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{{- '<tool_call>\\n' + {'name': f['name'], 'arguments': f['arguments']} | tojson -}}"
    "{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|user|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{{- eos_token + '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


# A ChatML-style template (as Qwen's, without its default system prompt) for
# ``builtin:tiny-chatml``: no ``{% generation %}`` markers, like most models' own templates.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def chatml_tokenizer():
    """The built-in tokenizer with ChatML's two special tokens, ``<|im_end|>`` as its end of
    turn (eos) and :data:`CHATML_TEMPLATE`."""
    tok = build_tokenizer()
    tok.add_tokens([IM_START, IM_END], special_tokens=True)
    tok.eos_token = IM_END
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE on ``corpus`` (default: polm's synthetic corpus).

    Returns a ``transformers`` fast tokenizer with the chat template and special tokens set.
    """
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        from polm.corpus import tokenizer_corpus

        corpus = tokenizer_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


GENERATION_TAG = r"\{%-?\s*(?:end)?generation\s*-?%\}"


def strip_generation_tags(template: str) -> str:
    """The template without ``{% generation %}`` markers: they are transformers' extension for
    assistant masks in training, unknown to llama.cpp's and Ollama's template engines."""
    import re

    return re.sub(GENERATION_TAG, "", template)


def render_template(
    template: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """A chat template rendered as transformers renders it (sandboxed Jinja with loop controls,
    ``raise_exception`` and a ``tojson`` that keeps key order and escapes no HTML), for the
    runtimes without transformers (llama.cpp's GGUF files, onnxruntime-genai's exports, whose
    own template engine iterates no dictionaries). ``{% generation %}`` markers are dropped."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from polm.errors import PolmError

    def refuse(message: str):
        raise PolmError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = refuse
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(strip_generation_tags(template)).render(
        messages=messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
