"""LoRA on TensorRT: refitting an engine's weights by their ONNX initializer names.

An engine built with ``linfusion-build --refittable`` keeps the ONNX initializer names of its
weights, so the same initializer map the ONNX Runtime path uses (``runtime.lora``) names the
weights to change: ``trt.Refitter.set_named_weights(name, values)`` for each, plus the export's own
values for any weight TensorRT says it needs alongside (``get_missing_weights``: weights fused
into one layer are refitted together) and for weights an earlier LoRA changed that the new set
does not, then ``refit_cuda_engine``.

Swapping on a live pipeline deserializes a second copy of the engine and refits that one, so
that requests in flight finish on the old engine (the ONNX Runtime path's guarantee); GPU memory
holds both engines' weights until the old one is released.

Thin and reviewed like the rest of the TensorRT code: it cannot run on machines without a GPU,
so tests drive it with fakes of the few TensorRT calls it makes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


class RefitError(ValueError):
    """An engine that cannot take these weights; the message is one line that names the remedy."""


def refit_engine(trt, engine, weights: dict[str, np.ndarray], base: Callable[[list[str]], dict[str, np.ndarray]],
                 logger) -> int:
    """Set ``weights`` (initializer name -> values) on ``engine``; ``base(names)`` supplies the export's
    values for the other weights TensorRT needs. Returns how many weights were set."""
    if not getattr(engine, "refittable", True):
        raise RefitError("the TensorRT engine is not refittable; rebuild with linfusion-build --refittable to "
                         "swap LoRAs on TensorRT")
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    absent = sorted(set(weights) - refittable)
    if absent:
        raise RefitError(f"the TensorRT engine has no refittable weight {absent[0]} (TensorRT folded it at build); "
                         f"fuse this LoRA at export (linfusion-export --lora) and rebuild instead")
    keep = []  # trt.Weights does not copy: the arrays must outlive refit_cuda_engine
    for name, values in weights.items():
        keep.append(np.ascontiguousarray(values))
        if not refitter.set_named_weights(name, trt.Weights(keep[-1])):
            raise RefitError(f"TensorRT refused the new values of weight {name} {tuple(values.shape)}; rebuild the "
                             f"engines from this export")
    missing = [name for name in refitter.get_missing_weights() if name not in weights]
    if missing:
        for name, values in base(missing).items():
            keep.append(np.ascontiguousarray(values))
            refitter.set_named_weights(name, trt.Weights(keep[-1]))
    if not refitter.refit_cuda_engine():
        raise RefitError("TensorRT could not refit the engine (see its messages above); rebuild the engines")
    return len(weights) + len(missing)


def refitting_runner(runner, directory: Path, spec, weights: dict[str, np.ndarray], restore: set[str]):
    """``runtime.lora``'s rebuild step for TensorRT: a second copy of ``runner``'s engine, refitted with
    ``weights`` and with the export's values for ``restore`` (weights an earlier LoRA changed)."""
    from linfusion.runtime.lora_onnx import read_initializers

    backend = getattr(runner, "backend", None)
    if backend is None:  # a component without an engine runs on ONNX Runtime
        from linfusion.runtime.lora import onnxruntime_runner

        return onnxruntime_runner(runner, directory, spec, weights, restore)
    if not getattr(runner.engine_spec, "refittable", False):
        raise RefitError(f"the TensorRT engine of {runner.name} was not built refittable; rebuild with "
                         f"linfusion-build --refittable to swap LoRAs on TensorRT")
    onnx_path = Path(directory) / spec.path

    def base(names: list[str]) -> dict[str, np.ndarray]:
        return read_initializers(onnx_path, names)

    restored = base(sorted(restore - set(weights))) if restore - set(weights) else {}
    new = backend.load(Path(directory), runner.name, spec)
    refit_engine(backend.trt, new.engine, {**restored, **weights}, base, backend.trt_logger)
    return new
