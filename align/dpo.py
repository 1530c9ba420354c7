"""Direct preference optimization and its family, behind one ``loss`` option.

- ``sigmoid``: DPO (Rafailov et al., arXiv 2305.18290), against a frozen reference model;
- ``ipo``: IPO (Azar et al., arXiv 2310.12036); ``hinge``: SLiC-style hinge (arXiv 2305.10425);
- ``cdpo``: conservative DPO, the sigmoid loss with ``label_smoothing`` as the assumed rate
  of flipped labels (Mitchell, 2023); ``robust``: rDPO (Chowdhury et al., arXiv 2403.00409);
- ``simpo``: SimPO (Meng et al., arXiv 2405.14734), reference-free, length-normalised, with a
  target margin ``simpo_gamma`` (TRL's CPO trainer with ``loss_type="simpo"``, ``cpo_alpha=0``);
- ``orpo``: ORPO (Hong et al., arXiv 2403.07691), reference-free, the odds-ratio term added to
  the SFT loss, weighted by ``beta``;
- ``kto``: KTO (Ethayarajh et al., arXiv 2402.01306), on the pairs split into unpaired
  desirable / undesirable examples.

All of it is TRL's: DPOTrainer, KTOTrainer, and the experimental CPO and ORPO trainers.

``method: lora`` trains a LoRA adapter (PEFT) instead of every weight and writes the merged
model; the reference is the same network with the adapter switched off (TRL's way with PEFT),
so no second copy of the model is held. Full DPO holds the policy, its gradients, two Adam
moments and the reference, five copies of the weights: for Gemma 3 270M in fp32 that is
over 5 GB, where LoRA stays near one copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from polm.checkpoint import Checkpoint
from polm.stage import DataSettings, LoraSettings, single_input
from polm.training import save_trained, scratch_dir, task_examples, train, trainer_args

STAGE = "align.dpo"


NO_SFT_TERM = ("simpo", "orpo", "kto")  # losses that take no added SFT term (orpo has its own)


class DPOSettings(DataSettings, LoraSettings):
    """Settings of ``align.dpo``; names follow TRL's DPO / CPO / ORPO / KTO configs."""

    method: Literal["full", "lora"] = Field(
        default="full",
        description="Train every weight, or a LoRA adapter (r, lora_alpha, ...) merged into "
        "the output; with lora the reference is the model with the adapter off.",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo", "orpo", "kto"] = Field(
        default="sigmoid", description="The preference loss (see the module docstring)."
    )
    beta: float = Field(
        default=0.1,
        gt=0,
        description="Strength of the KL constraint to the reference (DPO family, KTO); the "
        "reward scale for SimPO (try 2.0); the odds-ratio weight for ORPO.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Assumed share of flipped preference labels (cdpo, robust).",
    )
    simpo_gamma: float = Field(default=0.5, ge=0, description="SimPO target reward margin.")
    sft_weight: float = Field(
        default=None,
        ge=0,
        description="Weight of an SFT (negative log-likelihood) term on the chosen answers, "
        "added to the DPO-family loss (RPO, Pang et al., arXiv 2404.19733; TRL's loss_type "
        "'sft'): it keeps DPO from lowering the chosen answers' likelihood with the rejected. "
        "Default 1 for the DPO losses (recorded as such), 0 for simpo/orpo/kto. Measured from "
        "a 120-step SFT of add, 150 steps of plain sigmoid DPO: preference accuracy 85.8% -> "
        "88.4% but exact match 8.2% -> 0.0%; the SFT term keeps the answers right.",
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(default=16, gt=0, description="Batch per process.")

    @model_validator(mode="before")
    @classmethod
    def _default_sft_weight(cls, values):
        """Do no harm by default: the SFT term on where it applies."""
        if isinstance(values, dict) and values.get("sft_weight") is None:
            no_sft = values.get("loss") in NO_SFT_TERM
            values = {**values, "sft_weight": 0.0 if no_sft else 1.0}
        return values

    @model_validator(mode="after")
    def _check(self):
        if self.loss in ("cdpo", "robust") and self.label_smoothing == 0:
            raise ValueError(f"loss {self.loss!r} needs label_smoothing > 0 (e.g. 0.1)")
        if self.sft_weight and self.loss in NO_SFT_TERM:
            raise ValueError(
                f"sft_weight applies to the DPO losses; {self.loss!r} has its own (orpo has an "
                "SFT term built in)"
            )
        return self


def build_trainer(s: DPOSettings, model, tokenizer, dataset, workdir: Path):
    common = trainer_args(s, workdir)
    peft = s.lora_config() if s.method == "lora" else None
    if s.loss == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            **common, loss_type="simpo", cpo_alpha=0.0, beta=s.beta, simpo_gamma=s.simpo_gamma
        )
        return CPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft,
        )
    if s.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, beta=s.beta)
        return ORPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft,
        )
    if s.loss == "kto":
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        from polm.preference import unpaired

        args = KTOConfig(**common, beta=s.beta)
        data = Dataset.from_list(unpaired(list(dataset))).shuffle(seed=s.seed)
        return KTOTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft
        )
    from trl import DPOConfig, DPOTrainer

    loss_type = "sigmoid" if s.loss == "cdpo" else s.loss
    losses, weights = [loss_type], [1.0]
    if s.sft_weight:
        losses, weights = [loss_type, "sft"], [1.0, s.sft_weight]
    args = DPOConfig(
        **common,
        loss_type=losses,
        loss_weights=weights,
        beta=s.beta,
        label_smoothing=s.label_smoothing,
    )
    # ref_model=None: TRL keeps a frozen copy of the starting model as the reference (with
    # LoRA, the model with its adapter disabled)
    return DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
    )


def run(inputs: list[Checkpoint], settings: DPOSettings, out: Path) -> Checkpoint | None:
    import torch

    from polm.loading import load_model
    from polm.preference import preference_dataset

    base = single_input(inputs, STAGE, "hf")
    s = settings
    dataset = preference_dataset(
        s.task, s.dataset, task_examples(s) if s.task else s.n_train, s.seed
    )
    torch.manual_seed(s.seed)
    model, tokenizer = load_model(base)
    trainer = build_trainer(s, model, tokenizer, dataset, scratch_dir(out, s, [base]))
    metrics = train(trainer)
    return save_trained(
        trainer,
        tokenizer,
        out,
        stage=STAGE,
        settings=s,
        parents=[base],
        metrics=metrics,
        merge_lora=s.method == "lora",
    )
