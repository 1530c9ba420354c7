"""Serving: an OpenAI-compatible BentoML service for any polm checkpoint.

``service.py`` is the BentoML service (``bentoml serve serve.service:Polm``, or ``polm
serve``); ``protocol.py`` the OpenAI request and response types with their bounds; ``app.py``
the routes, limits and OpenAI-shaped errors; ``backends/`` the engines (transformers,
onnxruntime-genai, vLLM on a GPU), chosen from the checkpoint's format; ``static/`` the chat
page; ``edge.py`` edge packages (an int4 ONNX model, its lineage, checksums and
``edge_runner.py``, which needs onnxruntime-genai alone).
"""
