"""Optimization stages, one file each, registered in ``polm.registry``:

- ``distill``: knowledge distillation into a smaller student (TRL's GKD trainer, polm's loss);
- ``gptq``: GPTQ weight quantization with GPTQModel, on CPU or GPU;
- ``onebit``: 1-bit (OneBit) or ternary (BitNet b1.58) weights, packed, with recovery by
  distillation from the parent;
- ``onnx``: export with onnxruntime-genai's model builder, with a parity check.

Their outputs' formats (``gptq``, ``onebit``, ``onnx``) are opened by the spine
(``polm.loading``, ``polm.onnxrt``), never through these modules.
"""
