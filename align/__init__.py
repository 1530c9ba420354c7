"""Alignment stages: supervised fine-tuning and PEFT (this release); preference optimization,
RLHF and reasoning-oriented RL follow. Each stage is one file exposing
``run(inputs, settings, out) -> Checkpoint`` and a strict settings model."""
