"""Which linear-attention layer diverges first, when a UNet check fails.

The ONNX side: a temporary copy of the model with every ``linfusion::LinearAttention`` node's
output marked as a graph output (polygraphy's ModifyOutputs), run on the failing case. The
reference side: the attention core of each PyTorch layer, recorded in call order, which is
exactly what the node computes (the attention output before ``to_out``). Layers are named
after their UNet module, as the nodes are.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linfusion.runtime.contract import ops

from ..comparison import Feed, Tolerance, compare_outputs, run_runner


@dataclass
class LayerResult:
    layer: str
    max_rel_error: float
    cosine: float
    passed: bool


@dataclass
class Localisation:
    component: str
    backend: str
    case: str
    first_divergent: str | None
    layers: list[LayerResult] = field(default_factory=list)
    note: str = ""

    def message(self) -> str:
        if self.first_divergent:
            layer = next(r for r in self.layers if r.layer == self.first_divergent)
            return (f"layer {self.first_divergent} diverges first (max rel error {layer.max_rel_error:.2e}, "
                    f"cosine {layer.cosine:.6f}) in {self.case}")
        return self.note or f"every linear-attention layer matches in {self.case}; the divergence is elsewhere"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message()}


def onnx_attention_outputs(onnx_path: Path, feed: Feed, providers: list[str]) -> dict[str, np.ndarray]:
    """The output of every LinearAttention node on ``feed``, keyed by node name (= module name)."""
    import onnx
    from polygraphy.backend.onnx import ModifyOutputs, SaveOnnx
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    model = onnx.load(str(onnx_path))
    tensors = {node.output[0]: node.name for node in model.graph.node if node.domain == ops.DOMAIN and node.op_type == ops.LINEAR_ATTENTION}
    if not tensors:
        return {}
    with tempfile.TemporaryDirectory(prefix="linfusion-validate-") as tmp, G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        marked = Path(tmp) / "model.onnx"
        SaveOnnx(ModifyOutputs(model, mark_types=[ops.LINEAR_ATTENTION]), str(marked))()
        del model
        runner = OnnxrtRunner(SessionFromOnnx(str(marked), providers=providers), name="onnxruntime-layers")
        outputs = run_runner(runner, [feed])[0]
    return {tensors[name]: array for name, array in outputs.items() if name in tensors}


def first_divergence(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                     tolerance: Tolerance) -> tuple[str | None, list[LayerResult], str]:
    """Walk the layers in the reference's call order; the first one outside tolerance diverges first."""
    results: list[LayerResult] = []
    first = None
    missing = [name for name in reference if name not in got]
    for name in reference:
        if name not in got:
            continue
        metrics = compare_outputs({name: reference[name]}, {name: got[name]}, tolerance)[0]
        results.append(LayerResult(name, metrics.max_rel_error, metrics.cosine, metrics.passed))
        if first is None and not metrics.passed:
            first = name
    note = f"no ONNX node for layer(s) {', '.join(missing)}" if missing else ""
    return first, results, note


def localise(component: str, backend: str, case: str, onnx_path: Path, feed: Feed,
             reference: Mapping[str, np.ndarray], tolerance: Tolerance, providers: list[str]) -> Localisation:
    if not reference:
        return Localisation(component, backend, case, None, note="no reference layer outputs for this case")
    got = onnx_attention_outputs(onnx_path, feed, providers)
    if not got:
        return Localisation(component, backend, case, None, note="the ONNX model has no LinearAttention nodes")
    first, layers, note = first_divergence(reference, got, tolerance)
    return Localisation(component, backend, case, first, layers, note)
