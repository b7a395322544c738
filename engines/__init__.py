"""TensorRT engines built from an export directory, with the linear-attention plugin."""
