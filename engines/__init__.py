"""TensorRT engines built from an export directory, with the fused linear-attention plugins.

``linfusion-build DIR`` (``cli``) builds one engine per component (``builder``, the only module
that touches TensorRT, imported lazily) from a prepared copy of each ONNX file (``onnx_prep``:
each ``linfusion::LinearAttention`` node becomes ``LinearAttentionState`` ->
``LinearAttentionReduce`` -> ``LinearAttentionApply``, three TensorRT AOT Python plugins
registered in ``plugin``), with optimization profiles from ``profiles`` and the engine manifest
``engines/engines.json`` (schema in ``linfusion.runtime.engine_manifest``). The CUDA kernels are
``kernels/linear_attention.cu``; ``kernels`` holds their tiling, launch geometry and NVRTC/nvcc
compilation. See docs/engines.md.
"""
