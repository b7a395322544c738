"""ONNX export of LinFusion pipelines into an export directory (the contract read by engines and runtime)."""
