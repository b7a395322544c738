"""LoRA hot-swap in the runtime, without PyTorch.

``Pipeline.from_export(dir, loras=[(path, scale), ...])`` and ``pipe.set_loras([...])``: each
LoRA's ``scale * alpha / rank * up @ down`` is added in numpy to the export's own weights (read
from the ONNX file, ``lora_onnx``), found through the export's initializer map
(``<component>/lora_map.json``, written by ``linfusion.export.lora``), and the UNet and text
encoder sessions are created again from the model with those weights written in, in memory
(``onnxruntime_runner``): no re-export, no torch. Several LoRAs add up in order, as
diffusers' load + fuse does. Every file and scale is checked, and every update computed, before
any session is built, so a bad LoRA leaves the pipeline as it was.

Thread safety: ``generate`` pins the UNet and text encoders it starts with (``pinned``), and
``set_loras`` swaps in the new ones under a short lock once they are built, so requests in flight
finish with the weights they started with while new requests get the new ones. Building the new
sessions holds the old ones in memory too until the last request that uses them ends.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .lora_keys import LoraError, LoraModule, check_scale, lora_modules, parse_lora_arg, read_lora_file
from .lora_onnx import OnnxReadError, patched_model, read_initializers

__all__ = ["LoraError", "LoraUpdate", "install", "pinned", "prepare"]

MAP_FORMAT = "linfusion-lora-map"
_SWAP = threading.Lock()
"""Held only while a generation pins its models or set_loras swaps them in (microseconds)."""
_SERIAL = threading.Lock()
"""set_loras calls run one at a time."""
_PINS = threading.local()
_USERS: dict[int, int] = {}
"""id(runner) -> how many generations have it pinned (under _SWAP)."""
_RETIRED: dict[int, Any] = {}
"""Runners set_loras swapped out while generations still used them: closed when the last one ends."""


@dataclass
class LoraUpdate:
    """What ``prepare`` computed: the new initializer values per component, and what was applied."""

    weights: dict[str, dict[str, np.ndarray]]
    """component -> ONNX initializer name -> new value (the export's dtype)."""
    records: list[dict[str, Any]]
    """Per file: file, scale, tensors applied per component, modules the model lacks (count, first)."""
    components: tuple[str, ...]
    """Every component that has an initializer map (rebuilt when its weights change)."""


def normalize(loras: Sequence[tuple[str | Path, float] | str | Path] | None) -> list[tuple[Path, float]]:
    """(path, scale) pairs from pairs, ``PATH[:SCALE]`` strings or paths; scales checked."""
    result = []
    for item in loras or ():
        path, scale = (item if isinstance(item, tuple) else parse_lora_arg(str(item)))
        result.append((Path(path).expanduser(), check_scale(scale, path)))
    return result


def read_map(directory: Path, spec) -> dict[str, dict[str, Any]]:
    path = Path(directory) / spec.lora_map
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"cannot read {path} ({exc}); re-export the model") from None
    if document.get("format") != MAP_FORMAT:
        raise LoraError(f"{path} is not a LoRA initializer map; re-export the model")
    return document["parameters"]


def prepare(directory: str | Path, manifest, loras) -> LoraUpdate:
    """Check every LoRA and compute the overridden initializers; raises LoraError (one line)."""
    directory = Path(directory)
    sources = normalize(loras)
    specs = {name: spec for name, spec in manifest.components.items() if getattr(spec, "lora_map", None)}
    if sources and not specs:
        raise LoraError(f"{directory} was exported without LoRA initializer maps; re-export it with this "
                        f"version of linfusion-export to use LoRAs at run time")
    maps = {name: read_map(directory, spec) for name, spec in specs.items()}
    known = {name: {p[:-7] for p in m if p.endswith(".weight")} for name, m in maps.items()}
    found: list[tuple[LoraModule, float]] = []
    records = []
    for path, scale in sources:
        tensors, metadata = read_lora_file(path)
        modules, unplaced = lora_modules(tensors, metadata, known, path.name)
        if not modules:
            raise LoraError(f"{path.name}: none of its {len(unplaced)} modules exist in this model; is the LoRA "
                            f"for another architecture?")
        found += [(module, scale) for module in modules]
        applied: dict[str, int] = {}
        for module in modules:
            applied[module.component] = applied.get(module.component, 0) + 1
        records.append({"file": path.name, "scale": scale, "applied": applied, "unplaced": len(unplaced),
                        "first_unplaced": unplaced[0] if unplaced else None})
    weights = {name: _component_weights(directory, specs[name], maps[name],
                                        [(m, s) for m, s in found if m.component == name])
               for name in specs if any(m.component == name for m, _ in found)}
    return LoraUpdate(weights, records, tuple(specs))


def summary(record: dict[str, Any]) -> str:
    """One line for a ``Pipeline.loras`` record."""
    line = f"lora {record['file']} (scale {record['scale']:g}): " + ", ".join(
        f"{n} tensors on {c}" for c, n in record["applied"].items())
    if record["unplaced"]:
        line += f"; {record['unplaced']} modules this model lacks, skipped (first: {record['first_unplaced']})"
    return line


def _component_weights(directory: Path, spec, mapping: dict[str, dict], updates) -> dict[str, np.ndarray]:
    """New values of every initializer that holds a weight the updates change (a weight the exporter stored
    several times, e.g. once per token-chunk window, is changed in every copy)."""
    sharing: dict[str, list[str]] = {}
    for param, entry in mapping.items():
        for name, _ in entry["initializers"]:
            sharing.setdefault(name, []).append(param)
    for module, _ in updates:
        param = f"{module.module}.weight"
        if param not in mapping:  # known comes from the map, so this cannot happen
            raise LoraError(f"{module.key}: {param} is not in the export's initializer map; re-export the model")
        others = [p for name, _ in mapping[param]["initializers"] for p in sharing[name] if p != param]
        if others:
            raise LoraError(f"{module.key}: the export stores {param} in one ONNX weight with {others[0]} (equal "
                            f"values), so it cannot be changed alone; fuse this LoRA at export (linfusion-export "
                            f"--lora)")
    names = {name for module, _ in updates for name, _ in mapping[f"{module.module}.weight"]["initializers"]}
    try:
        base = read_initializers(Path(directory) / spec.path, names)
    except OnnxReadError as exc:
        raise LoraError(str(exc)) from None
    result: dict[str, np.ndarray] = {}
    for module, scale in updates:  # in order: sequential fusion, as diffusers fuses one LoRA after another
        for name, transposed in mapping[f"{module.module}.weight"]["initializers"]:
            current = result.get(name, base[name].astype(np.float32))
            if transposed:
                result[name] = current + module.delta(current.T.shape, scale).T
            else:
                result[name] = current + module.delta(current.shape, scale)
    return {name: np.ascontiguousarray(value.astype(base[name].dtype)) for name, value in result.items()}


def onnxruntime_runner(runner, directory: Path, spec, weights: dict[str, np.ndarray], restore: set[str]):
    """A new ONNX Runtime session of ``spec``'s model like ``runner``'s (options, providers), from the model
    with ``weights`` written in (``restore``, weights an earlier LoRA changed, come from the file anyway).

    The model is rewritten in memory (``lora_onnx.patched_model``), not overridden with
    ``SessionOptions.add_initializer``: ORT's graph transformers (NCHWc convolution layouts, fp16 fusions)
    read initializers from the model, not the overrides (measured: LoRAs on 1x1 convs and every LoRA on an
    fp16 export were lost), so only a model that holds the new values is optimized as the fused export is.
    """
    import onnxruntime as ort

    from .backends.onnxruntime import OnnxRuntimeRunner

    options = runner.new_options()  # the backend's settings: threads, arena, prepacking, graph level
    try:
        model, external = patched_model(Path(directory) / spec.path, weights)
    except OnnxReadError as exc:
        raise LoraError(str(exc)) from None
    if external:  # weights in model.onnx_data: the file's contents from memory, copy-on-write
        options.add_external_initializers_from_files_in_memory(list(external), list(external.values()),
                                                               [array.size for array in external.values()])
    provider_options = runner.session.get_provider_options()
    providers = [(name, provider_options.get(name, {})) for name in runner.session.get_providers()]
    session = ort.InferenceSession(model, options, providers=providers)
    del external  # ORT copied what it needs
    return OnnxRuntimeRunner(runner.name, runner.spec, session, runner.io_binding, runner.new_options)


def install(pipe, update: LoraUpdate, rebuild: Callable | None = None) -> None:
    """Build the changed components' runners, then swap them (and the text stack) in atomically."""
    from .prompts import TextStack

    rebuild = rebuild or _rebuilder(pipe)
    previous: dict[str, set[str]] = pipe.__dict__.get("_lora_changed", {})
    changed = {name for name in update.components if update.weights.get(name) or previous.get(name)}
    real = pipe.__dict__["runners"]
    built = {name: rebuild(real[name], Path(pipe.directory), pipe.manifest.components[name],
                           update.weights.get(name, {}), previous.get(name, set())) for name in sorted(changed)}
    text = pipe.__dict__["text"]
    if any(name in built for name in pipe.facts.text_encoders):
        encoders = [built.get(name, real[name]) for name in pipe.facts.text_encoders]
        text = TextStack(text.tokenizers, encoders, text.xl)
    with _SWAP:
        old = [real[name] for name in built]
        real.update(built)
        closing = [runner for runner in old if not _USERS.get(id(runner))]
        _RETIRED.update({id(runner): runner for runner in old if _USERS.get(id(runner))})
        pipe.__dict__["text"] = text
        pipe.__dict__["_lora_changed"] = {name: set(weights) for name, weights in update.weights.items()}
        pipe.__dict__["loras"] = update.records
    for runner in closing:  # a TensorRT engine's GPU memory; nothing for ONNX Runtime
        runner.close()


def _rebuilder(pipe) -> Callable:
    if pipe.backend == "tensorrt":
        from linfusion.engines.refit import refitting_runner

        return refitting_runner
    return onnxruntime_runner


def set_loras(pipe, loras) -> list[dict[str, Any]]:
    """Replace the pipeline's LoRAs (an empty list removes them); returns what was applied."""
    with _SERIAL:
        install(pipe, prepare(pipe.directory, pipe.manifest, loras))
    return pipe.loras


class Pinned:
    """A Pipeline attribute a thread inside ``generate`` sees as it was when that call began.

    For the runner dict, only the LoRA-able components are pinned; the rest (a deferred VAE
    encoder loaded on first use) reads and writes through to the live dict.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        live = obj.__dict__[self.name]
        pins = getattr(_PINS, "by_pipeline", {}).get(id(obj))
        if pins is None:
            return live
        return _Overlay(live, pins["runners"]) if self.name == "runners" else pins[self.name]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value


class _Overlay(MutableMapping):
    def __init__(self, live: dict, pinned: dict) -> None:
        self.live, self.pinned = live, pinned

    def __getitem__(self, key):
        return self.pinned[key] if key in self.pinned else self.live[key]

    def __setitem__(self, key, value) -> None:
        self.live[key] = value

    def __delitem__(self, key) -> None:
        del self.live[key]

    def __iter__(self) -> Iterator:
        return iter(self.live)

    def __len__(self) -> int:
        return len(self.live)


def pinned(method: Callable) -> Callable:
    """Decorate ``Pipeline.generate``: the call runs with the UNet and text encoders it started with."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        pins = _PINS.__dict__.setdefault("by_pipeline", {})
        if id(self) in pins:  # nested call in the same thread: keep the outer pin
            return method(self, *args, **kwargs)
        with _SWAP:
            live = self.__dict__["runners"]
            maps = [n for n, s in self.manifest.components.items() if getattr(s, "lora_map", None) and n in live]
            pins[id(self)] = {"runners": {name: live[name] for name in maps}, "text": self.__dict__["text"]}
            for runner in pins[id(self)]["runners"].values():
                _USERS[id(runner)] = _USERS.get(id(runner), 0) + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            closing = []
            with _SWAP:
                for runner in pins.pop(id(self))["runners"].values():
                    _USERS[id(runner)] -= 1
                    if not _USERS[id(runner)]:
                        del _USERS[id(runner)]
                        closing += [_RETIRED.pop(id(runner))] if id(runner) in _RETIRED else []
            for runner in closing:
                runner.close()

    return wrapper
