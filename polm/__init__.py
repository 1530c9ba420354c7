"""polm: post-training for language models, from alignment to serving, in one recipe.

The spine: the checkpoint contract, the stage registry, the recipe runner, evaluation, the
built-in tiny models, tokenizer and synthetic tasks. Stage packages (``align``, ``merge``,
``optimize``, ``serve``) import this package, never each other.
"""

import os

# Nothing is downloaded from a model or dataset hub at run time: models come in through
# `polm import` from local files. Users who really want the hub can set these to 0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"

# torchao (pulled in by GPTQModel, imported by transformers when present) warns at import about
# CUDA-only kernels it cannot load on a CPU machine and about pytree registrations: noise.
import logging  # noqa: E402

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
