"""Optimization stages (distillation, GPTQ, 1-bit, ONNX export): not yet implemented."""
