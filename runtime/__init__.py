"""Torch-free runtime: reads an export directory and generates images with numpy and ONNX Runtime.

This is the bottom layer. It owns the export manifest schema and imports nothing from
``linfusion`` (the PyTorch model), ``linfusion.export`` or ``linfusion.engines``.
"""
