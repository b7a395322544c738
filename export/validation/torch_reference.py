"""The PyTorch reference: diffusers with LinFusion mounted, rebuilt from the export's recorded source.

Each component is cast to the precision the manifest records for it (so an SD-XL VAE that
stayed fp32 in an fp16 export is compared in fp32), and driven through the same wrappers and
input makers the exporter traced, so both sides see identical inputs and outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from linfusion.attention import GeneralizedLinearAttention
from linfusion.loader import load_pipeline
from linfusion.runtime.contract import UNetIO, component_kind
from linfusion.runtime.manifest import Manifest

from ..components import Component, build_component
from ..controlnet import attach_recorded, controlnets_of
from .cases import Case, CaseError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ReferenceSource:
    """Where the reference model comes from: the manifest's record unless the user overrides it."""

    model: str
    linfusion: str | None = None
    random_weights: bool = False
    seed: int = 0
    revision: str | None = None
    vae: str | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, model: str | None = None, linfusion: str | None = None,
                      random_weights: bool | None = None) -> ReferenceSource:
        source = manifest.source
        if model is not None:
            return cls(model, linfusion, bool(random_weights), int(source.get("seed") or 0))
        return cls(source.get("preset") or source["model"], linfusion or source.get("linfusion"),
                   bool(source.get("random_weights")) if random_weights is None else random_weights,
                   int(source.get("seed") or 0), source.get("base_revision"), source.get("vae"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TorchReference:
    """Runs each exported component's PyTorch module on numpy feeds."""

    def __init__(self, manifest: Manifest, source: ReferenceSource, components: list[str]) -> None:
        self.source = source
        loaded = load_pipeline(source.model, linfusion=source.linfusion, random_weights=source.random_weights,
                               dtype=DTYPES[manifest.precision], seed=source.seed, revision=source.revision,
                               vae=source.vae)
        attach_recorded(loaded, manifest.source)  # the export's ControlNets, if it has any
        self.pipeline = loaded.pipeline
        self.components: dict[str, Component] = {}
        for name in components:
            spec = manifest.components[name]
            self.components[name] = self._component(spec.kind, DTYPES[spec.precision], loaded.is_xl,
                                                    manifest.latent_multiple, name)

    def _component(self, kind_name: str, dtype: torch.dtype, xl: bool, latent_multiple: int,
                   name: str) -> Component:
        kind = component_kind(kind_name)
        module = (controlnets_of(self.pipeline).get(name) if kind.attached
                  else getattr(self.pipeline, kind.source_module, None))
        if module is None:
            raise CaseError(f"the reference model '{self.source.model}' has no {name}")
        module.to(dtype=dtype)
        return build_component(kind, self.pipeline, xl, latent_multiple, dtype, name)

    def inputs(self, case: Case, seed: int, vae_factor: int) -> dict[str, np.ndarray]:
        component = self.components[case.component]
        generator = torch.Generator().manual_seed(case.seed(seed))
        tensors = list(component.make_inputs(case.batch, *case.component_size(vae_factor), generator))
        names = [spec.name for spec in component.inputs]
        if case.timestep is not None:
            tensors[names.index(UNetIO.timestep)] = torch.full((case.batch,), float(case.timestep))
        return {name: _to_numpy(t) for name, t in zip(names, tensors)}

    def outputs(self, case: Case, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        component = self.components[case.component]
        with torch.no_grad():
            result = component.module(*self._tensors(component, feed))
        result = result if isinstance(result, tuple) else (result,)
        return {spec.name: _to_numpy(t) for spec, t in zip(component.outputs, result)}

    def attention_outputs(self, case: Case, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """Each LinFusion layer's attention core output (what its ONNX node computes), in call order."""
        component = self.components[case.component]
        captured: OrderedDict[str, np.ndarray] = OrderedDict()
        with _capture_cores(component.module, captured), torch.no_grad():
            component.module(*self._tensors(component, feed))
        return captured

    @staticmethod
    def _tensors(component: Component, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = []
        for spec in component.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[spec.name]))
            tensors.append(t.to(component.dtype) if t.is_floating_point() and spec.dtype != "float32" else t)
        return tensors


@contextmanager
def _capture_cores(model: torch.nn.Module, captured: OrderedDict) -> Iterator[None]:
    """Shadow each layer's ``core`` with a recording wrapper; removed on exit."""
    root = getattr(model, "unet", model)
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, GeneralizedLinearAttention)]

    def recorder(name: str, layer: GeneralizedLinearAttention):
        original = type(layer).core.__get__(layer)

        def core(q, k, v):
            out = original(q, k, v)
            captured[name] = _to_numpy(out)
            return out
        return core

    for name, layer in layers:
        layer.core = recorder(name, layer)
    try:
        yield
    finally:
        for _, layer in layers:
            del layer.core


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return np.ascontiguousarray((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy())
