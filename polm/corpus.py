"""polm's synthetic corpus: what ``builtin:tiny-base`` is pretrained on and what perplexity is
measured on.

The base model should know the chat format, digits and letters, and a few skills that
post-training can build on, but not the ``add`` task itself, so that SFT has something real
to teach. Its corpus therefore mixes:

- short "prose" from a small grammar (counting, comparing, giving; numbers in words and
  digits), the held-out split of which is the perplexity text;
- the ``reverse`` task in the chat format (the base can already reverse words);
- reversal and zero-padding of digit strings in the chat format;
- single-digit addition facts with a carry as plain text (``7+8+1=16``).

Multi-digit addition in the chat format never appears.
"""

from __future__ import annotations

import random
import string

from polm.tasks import get_task

NAMES = ["ada", "bob", "cy", "dee", "eve", "finn", "gus", "hal", "ivy", "jo"]
THINGS = ["apples", "books", "coins", "cups", "dogs", "eggs", "keys", "pens", "rings", "stones"]
VERBS = ["has", "sees", "finds", "wants", "keeps", "sells"]
WORDS = "zero one two three four five six seven eight nine".split()


def _prose(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    n, m = rng.randint(0, 99), rng.randint(0, 9)
    thing = rng.choice(THINGS)
    forms = [
        f"{a} {rng.choice(VERBS)} {n} {thing}.",
        f"{a} gives {m} {thing} to {b}.",
        f"{a} has {WORDS[m]} {thing} and {b} has {n}.",
        f"after {n} comes {n + 1}, and after {n + 1} comes {n + 2}.",
        f"{n} is {'more' if n > m else 'less' if n < m else 'the same'} than {m}.",
        f"{a} counts: {', '.join(str(i) for i in range(m, m + 4))}.",
    ]
    return " ".join(rng.choice(forms) for _ in range(rng.randint(2, 4)))


def prose(split: str, n: int) -> list[str]:
    """``n`` lines of synthetic prose; ``train`` and ``heldout`` come from different seeds."""
    rng = random.Random(f"polm-prose-{split}")
    return [_prose(rng) for _ in range(n)]


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _digit_skill(rng: random.Random) -> list[dict]:
    digits = "".join(rng.choices(string.digits, k=rng.randint(1, 6)))
    if rng.random() < 0.5:
        return _chat(f"reverse {digits}", digits[::-1])
    width = rng.randint(len(digits), 6)
    return _chat(f"pad {digits} to {width}", digits.zfill(width))


def _facts(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(4, 8)):
        x, y, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
        facts.append(f"{x}+{y}+{c}={x + y + c:02d}")
    return " ".join(facts)


def pretraining_documents(n: int, seed: int = 0) -> list[str | list[dict]]:
    """``n`` documents: plain strings (text) or message lists (rendered with the chat template)."""
    rng = random.Random(f"polm-pretrain-{seed}")
    reverse = get_task("reverse").examples("train")
    prose_lines = prose("train", n)
    docs: list[str | list[dict]] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.35:
            docs.append(prose_lines[i])
        elif kind < 0.6:
            ex = reverse[rng.randrange(len(reverse))]
            docs.append(_chat(ex.prompt, ex.answer))
        elif kind < 0.85:
            docs.append(_digit_skill(rng))
        else:
            docs.append(_facts(rng))
    return docs


def tokenizer_corpus() -> list[str]:
    """The text the BPE merges are learned from (fixed, so the tokenizer is reproducible)."""
    rng = random.Random("polm-tokenizer")
    texts = prose("train", 2000)
    texts += ["".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(2000)]
    texts += ["reverse pad to user assistant system"] * 50
    return texts
