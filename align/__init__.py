"""Alignment stages, one file each, each ``run(inputs, settings, out) -> Checkpoint`` with a
strict settings model, registered in ``polm.registry``:

- ``sft``: supervised fine-tuning (full, LoRA, prefix, prompt tuning; instruction data,
  continued pretraining, replay);
- ``reward``: a reward model (Bradley-Terry) on preference pairs;
- ``dpo``: the DPO family (DPO, IPO, hinge, cDPO, robust, SimPO, ORPO, KTO);
- ``ppo``: RLHF with PPO (polm's own loop: TRL has none);
- ``grpo``: RL with verifiable rewards (GRPO, RLOO);
- ``rlaif``: RL from AI feedback (a judge labels the policy's samples; DPO trains on them).

Self-refine is an inference mode of the spine (``polm.refine``), not a stage.
"""
