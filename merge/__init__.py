"""Merging stages, one file each, registered in ``polm.registry``:

- ``mergekit``: mergekit's methods on dense checkpoints (model soups, task arithmetic, TIES,
  DARE, DELLA, SLERP, model stock, ...), the base found through the lineage;
- ``lora``: LoRA adapters folded into their base or combined into one (PEFT);
- ``moe``: a sparse MoE (Mixtral, Qwen2-MoE) from dense experts with mergekit's MoE builder,
  or upcycled from one model, with router fitting, expert checks and a routing report.
"""
