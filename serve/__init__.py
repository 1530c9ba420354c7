"""Serving (BentoML service on vLLM / ONNX Runtime GenAI / transformers): not yet implemented."""
