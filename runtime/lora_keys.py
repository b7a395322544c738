"""LoRA files without PyTorch: checking them, and turning their keys into model parameter names.

Two key layouts are read, with the semantics of diffusers' ``load_lora_weights``:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``; keys without a component prefix belong to the UNet). The alphas come from
  the ``lora_adapter_metadata`` JSON diffusers writes into the safetensors header (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``), else from ``<module>.alpha`` tensors, else alpha = rank.
  The pre-PEFT spellings ``.lora.down.weight`` / ``.lora.up.weight`` and
  ``processor.to_q_lora.down.weight`` are read too.
- kohya / AUTOMATIC1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (``lora_te_`` for SD's text encoder, ``lora_te1_`` /
  ``lora_te2_`` for SD-XL's). Underscored names are resolved against the model's own module
  names (diffusers' names, which kohya's SD-1/2 files use; SD-XL's SGM block names are mapped
  by ``sgm_to_diffusers``).

diffusers' own converters need torch, so this is written here and tested against them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


class LoraError(ValueError):
    """A LoRA file or argument that cannot be used; the message is one line that names the remedy."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: ``scale * alpha / rank * up @ down`` added to ``component``'s ``module.weight``."""

    component: str
    module: str
    down: np.ndarray
    """(rank, in) or, for a convolution, (rank, in, kh, kw)."""
    up: np.ndarray
    """(out, rank) or (out, rank, 1, 1)."""
    alpha: float
    key: str
    """The file's key for ``down`` (for messages)."""
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """LoraError naming both shapes if this update cannot be added to a weight of ``shape``."""
        rank_up = int(np.prod(self.up.shape[1:])) if self.up.ndim > 1 else -1
        if self.up.shape[0] != shape[0] or rank_up != self.rank \
                or int(np.prod(self.down.shape[1:])) != int(np.prod(shape[1:])):
            raise LoraError(f"LoRA key {self.key} does not fit the model: up {tuple(self.up.shape)} @ down "
                            f"{tuple(self.down.shape)}, the model's {self.module}.weight is {tuple(shape)}; "
                            f"is the LoRA for another architecture?")

    def delta(self, shape: tuple[int, ...], scale: float) -> np.ndarray:
        """The float32 update ``scale * alpha / rank * up @ down`` for a weight of ``shape``."""
        self.check_fits(shape)
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        return (up @ down).reshape(shape) * np.float32(scale * self.factor)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a trailing ``:NUMBER`` is the scale (default 1.0)."""
    path, sep, tail = text.rpartition(":")
    if sep and _FLOAT.match(tail.strip()):
        return path, check_scale(float(tail), path)
    return text, 1.0


def check_scale(scale, path: str | Path = "") -> float:
    from .request import GenerationError, finite

    try:
        return finite(f"the LoRA scale of {path}", scale)
    except GenerationError as exc:
        raise LoraError(f"{exc}; pass a finite number such as 0.8") from None


def read_lora_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (numpy) and header metadata of a safetensors LoRA file; pickles are refused unread."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path} is a pickle ({path.suffix}) file, which can run code when loaded and is never "
                        f"opened here; convert it to .safetensors")
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    safetensors = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    if not safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):  # zip (torch.save) or pickle protocol 2+
        raise LoraError(f"{path} is a PyTorch pickle despite its name; it is never opened here: convert it "
                        f"to .safetensors")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraError(f"{path} is not a safetensors file ({first}); LoRAs must be .safetensors") from None
    if not tensors:
        raise LoraError(f"{path} holds no tensors; is it a LoRA?")
    return tensors, metadata


def check_file(path: str | Path) -> None:
    """What can be checked without the model: a readable safetensors LoRA of a known key layout."""
    tensors, metadata = read_lora_file(path)
    lora_modules(tensors, metadata, {}, Path(path).name)


def lora_modules(tensors: dict[str, np.ndarray], metadata: dict[str, str], modules: dict[str, set[str]],
                 name: str = "LoRA") -> tuple[list[LoraModule], list[str]]:
    """Convert a file's keys: (updates for modules the model has, keys of modules it lacks).

    ``modules``: component -> the module names that own a LoRA-able weight (``<module>.weight``).
    Unknown key layouts and bad alphas or ranks raise LoraError naming the first offending key.
    """
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        pairs, alphas = _kohya_pairs(tensors, name)
        config = {}
    else:
        pairs, alphas = _peft_pairs(tensors, name)
        config = _adapter_metadata(metadata, name)
    found, unplaced = [], []
    for (component, module), (down_key, up_key) in sorted(pairs.items()):
        down, up = tensors[down_key], tensors[up_key]
        if down.ndim not in (2, 4) or down.shape[0] != (up.shape[1] if up.ndim > 1 else -1):
            raise LoraError(f"{name}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} are not a "
                            f"LoRA pair (their ranks differ); is the file damaged?")
        if down.shape[0] == 0:
            raise LoraError(f"{name}: {down_key} has rank 0; a LoRA needs rank >= 1")
        resolved = resolve_module(component, module, modules.get(component, set()))
        if resolved is None:
            unplaced.append(down_key)
            continue
        alpha, rslora = _alpha(config, component, resolved, alphas.get((component, module)), down.shape[0])
        if not math.isfinite(alpha):
            raise LoraError(f"{name}: the alpha of {down_key} is {alpha}, not a finite number; the file is damaged")
        found.append(LoraModule(component, resolved, down, up, alpha, down_key, rslora))
    return found, unplaced


def resolve_module(component: str, module: str, known: set[str]) -> str | None:
    """The model's module name for a file's (possibly underscored or ``text_model.``-prefixed) name."""
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if candidate in known:
            return candidate
    if "." not in module:  # kohya: underscores stand for dots
        flat = {m.replace(".", "_"): m for m in known}
        sgm = sgm_to_diffusers(module, layers_per_block(known)) if module.startswith(("input_", "output_", "middle_")) \
            else module
        for candidate in (module, module.removeprefix("text_model_"), sgm):
            if candidate in flat:
                return flat[candidate]
    return None


def _peft_pairs(tensors, name):
    pairs, alphas = {}, {}
    prefixed = any(k.split(".", 1)[0] in COMPONENTS for k in tensors)
    for key, value in tensors.items():
        component, rest = key.split(".", 1) if prefixed else ("unet", key)
        if prefixed and component not in COMPONENTS:
            raise LoraError(f"{name}: unknown key format ({key}): not a diffusers/PEFT or kohya LoRA key")
        processor = _PROCESSOR.search(rest)
        if processor:
            module = rest[:processor.start()] + "." + processor[1] + (".0" if processor[1] == "to_out" else "")
            pairs.setdefault((component, module), [None, None])[processor[2] == "up"] = key
            continue
        if rest.endswith(".alpha") and value.size == 1:
            alphas[(component, rest[:-6])] = float(value.reshape(()))
            continue
        for down_suffix, up_suffix in _PAIRS:
            if rest.endswith((down_suffix, up_suffix)):
                is_up = rest.endswith(up_suffix)
                module = rest[:-len(up_suffix if is_up else down_suffix)]
                pairs.setdefault((component, module), [None, None])[is_up] = key
                break
        else:
            raise LoraError(f"{name}: unknown key format ({key}): not a diffusers/PEFT or kohya LoRA key "
                            f"(LoHa, LoKr and DoRA are not supported)")
    return _complete(pairs, name), alphas


def _kohya_pairs(tensors, name):
    pairs, alphas = {}, {}
    for key, value in tensors.items():
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
        base, _, suffix = key.partition(".")
        if prefix is None or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoraError(f"{name}: unknown key format ({key}): not a kohya LoRA key "
                            f"(LoHa, LoKr and DoRA are not supported)")
        component, module = KOHYA_PREFIXES[prefix], base[len(prefix):]
        if suffix == "alpha":
            alphas[(component, module)] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            pairs.setdefault((component, module), [None, None])[suffix == "lora_up.weight"] = key
    return _complete(pairs, name), alphas


def _complete(pairs, name):
    for (down, up) in pairs.values():
        if down is None or up is None:
            raise LoraError(f"{name}: {down or up} has no matching {'up' if up is None else 'down'} tensor; "
                            f"is the file damaged?")
    return {k: tuple(v) for k, v in pairs.items()}


def _adapter_metadata(metadata: dict[str, str], name: str) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: component -> its LoraConfig fields."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except ValueError:
        raise LoraError(f"{name}: its lora_adapter_metadata header is not JSON; the file is damaged") from None
    config: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        config.setdefault(component, {})[field] = value
    for component, fields in config.items():
        if fields.get("use_dora"):
            raise LoraError(f"{name}: a DoRA ({component}); only plain LoRAs are supported")
    return config


def _alpha(config, component, module, file_alpha, rank) -> tuple[float, bool]:
    """PEFT's rule: alpha_pattern's first key that matches the module's name, else lora_alpha."""
    fields = config.get(component)
    if fields and fields.get("lora_alpha") is not None:
        pattern = next((k for k in (fields.get("alpha_pattern") or {})
                        if re.match(rf"(.*\.)?({k})$", module)), None)
        alpha = fields["alpha_pattern"][pattern] if pattern else fields["lora_alpha"]
        return float(alpha), bool(fields.get("use_rslora"))
    return (float(file_alpha) if file_alpha is not None else float(rank)), False


_SGM = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.*)$")


def sgm_to_diffusers(module: str, layers_per_block: int = 2) -> str:
    """kohya's SD-XL UNet names (SGM blocks, underscored) -> diffusers', for the attention blocks.

    SGM counts layers across blocks: input_blocks 0 is conv_in, then each down block has
    ``layers_per_block`` layers and a downsampler; each up block has ``layers_per_block + 1`` layers.
    Layer 1 of an entry is its attention. middle_block_1 is mid_block.attentions.0.
    """
    if module.startswith("middle_block_1_"):
        return "mid_block_attentions_0_" + module.removeprefix("middle_block_1_")
    match = _SGM.match(module)
    if not match or match[3] != "1":
        return module
    index, rest, per = int(match[2]), match[4], layers_per_block + 1
    if match[1] == "input_blocks" and index >= 1 and (index - 1) % per < layers_per_block:
        return f"down_blocks_{(index - 1) // per}_attentions_{(index - 1) % per}_{rest}"
    if match[1] == "output_blocks":
        return f"up_blocks_{index // per}_attentions_{index % per}_{rest}"
    return module


def layers_per_block(known: set[str]) -> int:
    """The UNet's layers per down block, from its module names (down_blocks.0.resnets.N)."""
    found = [int(m.split(".")[3]) for m in known if m.startswith("down_blocks.0.resnets.")]
    return max(found) + 1 if found else 2
