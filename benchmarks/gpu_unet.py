"""GPU: PyTorch fp16 LinFusion UNet against the SDPA (flash) softmax UNet, SD-1.5 size, 1024-4096 px.

    python benchmarks/gpu_unet.py             # on a device session (about 3 minutes on an H100)

The same measurement as ``scaling.py`` (same weights on both sides, batch 1, interleaved repeats,
medians, exponent over the top 4x, crossover), on CUDA in fp16 and without the ONNX Runtime engine.
Writes results/gpu_unet.{json,md,png}. Without a CUDA GPU it says so and exits with status 2.
"""

from __future__ import annotations

import sys

import scaling

DEFAULTS = ["--variant", "sd15", "--device", "cuda", "--dtype", "fp16", "--engines", "eager,sdpa",
            "--sizes", "1024,1536,2048,3072,4096", "--repeats", "5", "--name", "gpu_unet"]


def main(argv: list[str] | None = None) -> int:
    try:
        import torch
    except ImportError:
        print("gpu_unet: needs torch with CUDA; nothing measured.")
        return 2
    if not torch.cuda.is_available():
        print("gpu_unet: no CUDA GPU visible; run this in a device session. Nothing measured.")
        return 2
    return scaling.main(DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
