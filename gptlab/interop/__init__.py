"""Interoperability with other ecosystems: Hugging Face, GGUF, ONNX."""
