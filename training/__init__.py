"""Training, evaluation and ONNX export for seg models."""
