"""Merging stages (mergekit methods, LoRA merge, MoE assembly): not yet implemented."""
