"""What a `polm` command imports, imported once per test worker by the fork server that
``tests.helpers.polm_cli`` starts its commands from (see there): about 5 s of imports a
command (torch, transformers, TRL, PEFT, datasets, mergekit, ONNX Runtime) paid once instead.

Only imports: nothing here computes, starts a thread or opens a file, so that a process forked
from this one starts as clean as a fresh interpreter. What the imports print (deprecation
warnings) goes nowhere: the tests that read what a fresh `polm` prints run it fresh."""

import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import mergekit.merge  # noqa: F401
    import onnxruntime  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer  # noqa: F401

    import polm.cli  # noqa: F401
    import polm.evaluate  # noqa: F401
    import polm.runner  # noqa: F401
    import polm.training  # noqa: F401

sys.stdout.flush()  # what the imports printed is not any command's output
sys.stderr.flush()
