"""LoRA at export: fused through diffusers, and the map that lets the runtime add LoRAs later.

Fusion (``linfusion-export --lora PATH[:SCALE]``) has exactly diffusers' semantics with LinFusion
mounted: for each file in order, ``pipe.load_lora_weights(path)`` then ``pipe.fuse_lora(lora_scale=
SCALE)``. The files are checked first with the runtime's torch-free reader (``runtime.lora_keys``),
so a pickle, a damaged file or a LoRA for another architecture fails in one line before diffusers
or the exporter runs. What diffusers could not place, and what it placed on LinFusion's own
attn1 projections (LinFusion keeps the names to_q/to_k/to_v/to_out.0), is counted in one line.

The initializer map (``<component>/lora_map.json``): for every weight of two or more dimensions of
the UNet and the text encoders, the ONNX initializers holding it (a weight may be stored more than
once) and whether each is stored transposed (the exporter folds ``Linear`` weights into transposed
``MatMul`` constants). It is found by content, since the exporter renames folded constants (``val_123``): each weight's bytes
are matched against every initializer and the transpose of every 2-D one. A weight the exporter
folded into something else (a GroupNorm scale) is absent; a LoRA on it cannot be hot-swapped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from linfusion.runtime.contract import Role
from linfusion.runtime.lora_keys import LoraError, lora_modules, read_lora_file
from linfusion.runtime.manifest import sha256_file

MAP_NAME = "lora_map.json"
MAP_FORMAT = "linfusion-lora-map"
MAP_VERSION = 1
LINFUSION_PROJECTION = re.compile(r"(^|\.)attn1\.(to_q|to_k|to_v|to_out\.0)$")
_OLD_LAYOUT = re.compile(r"(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|lora_magnitude_vector|alpha)"
                     r"(\.[a-z_]+)?(\.weight)?$")


def _content_key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, array.dtype.str, hashlib.blake2b(array.view(np.uint8).data, digest_size=16).digest()


def initializer_map(parameters: dict[str, np.ndarray], initializers: dict[str, np.ndarray]) -> dict[str, dict]:
    """parameter name -> {"initializers": [[name, transposed], ...]}: every initializer holding the parameter's
    values (or their transpose), for each parameter of 2+ dims found."""
    by_content: dict[tuple, list[tuple[str, bool]]] = {}
    for name, array in initializers.items():
        if array.ndim >= 2:
            by_content.setdefault(_content_key(array), []).append((name, False))
        if array.ndim == 2:
            by_content.setdefault(_content_key(array.T), []).append((name, True))
    found = {}
    for name, array in parameters.items():
        hits = by_content.get(_content_key(array)) if array.ndim >= 2 else None
        if hits:
            found[name] = {"initializers": sorted([hit_name, transposed] for hit_name, transposed in set(hits))}
    return found


def write_initializer_map(component, model, folder: Path) -> str | None:
    """Write ``lora_map.json`` beside a traced UNet or text encoder; returns its name (None: not LoRA-able)."""
    if component.kind.role not in (Role.DENOISER, Role.TEXT_ENCODER):
        return None
    parameters = {}
    for name, param in component.module.named_parameters():
        if param.ndim >= 2:  # the wrapper's attribute (unet. / encoder.) is not part of the model's names
            parameters[name.split(".", 1)[1]] = param.detach().cpu().numpy()
    initializers = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()
                    if value.const_value is not None}
    mapping = initializer_map(parameters, initializers)
    document = {"format": MAP_FORMAT, "format_version": MAP_VERSION, "parameters": mapping}
    (folder / MAP_NAME).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return MAP_NAME


def lora_components(pipe) -> dict[str, Any]:
    """The pipeline's LoRA-able models by component name."""
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def check_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Refuse (LoraError, one line) a file that is not a usable LoRA for ``pipe``, before any model runs."""
    shapes = {component: {name[:-7]: tuple(p.shape) for name, p in model.named_parameters()
                          if name.endswith(".weight") and p.ndim >= 2}
              for component, model in lora_components(pipe).items()}
    for path, _scale in loras:
        tensors, metadata = read_lora_file(path)
        found, _ = lora_modules(tensors, metadata, {c: set(s) for c, s in shapes.items()}, Path(path).name)
        if not found:
            raise LoraError(f"{Path(path).name}: none of its modules exist in this model; is the LoRA for "
                            f"another architecture?")
        for module in found:
            module.check_fits(shapes[module.component][module.module])


def fuse_loras(pipe, loras: list[tuple[str, float]], progress: Callable[[str], None] = print) -> list[dict]:
    """load_lora_weights + fuse_lora for each file in order; the manifest records that come back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    check_loras(pipe, loras)
    records = []
    for index, (path, scale) in enumerate(loras):
        path, adapter = Path(path), f"linfusion_lora_{index}"
        try:
            state = pipe.lora_state_dict(str(path))
            state = state[0] if isinstance(state, tuple) else state
            wanted = {_module_of(key) for key in state}
            pipe.load_lora_weights(str(path), adapter_name=adapter)
        except (IndexError, KeyError, ValueError, RuntimeError) as exc:  # diffusers' converters on odd files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoraError(f"diffusers cannot load {path.name} ({type(exc).__name__}: {first}); add it at run time "
                            f"instead (linfusion-generate --lora, Pipeline.from_export(loras=...))") from None
        placed = {component: sorted(name for name, module in model.named_modules()
                                    if isinstance(module, BaseTunerLayer) and adapter in module.lora_A)
                  for component, model in lora_components(pipe).items()}
        pipe.fuse_lora(lora_scale=scale, adapter_names=[adapter])
        pipe.unload_lora_weights()
        records.append(_record(path, scale, placed, wanted))
        progress(records[-1]["summary"])
    return records


def _module_of(key: str) -> tuple[str, str]:
    """(component, module) of a key of diffusers' ``lora_state_dict``, whichever layout it converted to."""
    component, _, rest = key.partition(".")
    rest = rest.removeprefix("text_model.")
    old = _OLD_LAYOUT.search(rest)
    if old:
        name = f"{old[2]}.0" if old[2] == "to_out" else old[2]
        name = name if component == "unet" else {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj"}.get(
            old[2], "out_proj")
        return component, f"{rest[:old.start()]}.{name}"
    return component, _SUFFIX.sub("", rest.replace(".lora_linear_layer.", ".lora."))


def _record(path: Path, scale: float, placed: dict[str, list[str]], wanted: set[tuple[str, str]]) -> dict:
    applied = {component: len(names) for component, names in placed.items() if names}
    have = {(component, name.removeprefix("text_model.")) for component, names in placed.items() for name in names}
    unplaced = sorted(f"{c}.{m}" for c, m in wanted - have)
    linfusion = sum(bool(LINFUSION_PROJECTION.search(name)) for name in placed.get("unet", []))
    summary = f"{path.name} (scale {scale:g}): " + (", ".join(f"{n} tensors on {c}" for c, n in applied.items())
                                                   or "nothing applied")
    if linfusion:
        summary += f"; {linfusion} of them on LinFusion's attn1 projections (to_q/to_k/to_v/to_out.0)"
    if unplaced:
        summary += f"; {len(unplaced)} modules diffusers could not place, dropped (first: {unplaced[0]})"
    return {"file": path.name, "sha256": sha256_file(path), "scale": scale, "applied": applied,
            "linfusion_projections": linfusion, "unplaced": len(unplaced), "summary": summary}
