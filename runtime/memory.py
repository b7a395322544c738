"""The memory guard: estimate a generation's peak memory before any model runs, and refuse
requests that cannot fit.

    footprint = Footprint.from_export(directory, manifest)
    est = estimate(footprint, height=1024, width=1024, batch=1, cfg="batched", vae_tile=None,
                   img2img=False, backend="onnxruntime")
    check_fits(est, memory_limit or available_bytes("onnxruntime"))   # MemoryGuardError if not

The model (constants fitted to measured peak RSS; formula, table and error in docs/memory.md):

* ONNX Runtime (host RSS): ``BASE`` + ``WEIGHT_FACTOR`` x the loaded components' weights on disk,
  plus the activations. With the runtime's default one CPU arena for all sessions
  (``Footprint.shared_arena``) the stages reuse it one after another: the largest stage counts (the
  UNet's and its ControlNets' together). With an arena per session (LINFUSION_ORT_ARENA=session or
  off) every stage's activations *add up*: each session keeps its arena at its high-water mark after
  a run, so the text encoder's, UNet's and VAE's arenas are all resident at the end.
  From the second call with the same shapes on (2+ steps, sequential CFG, 2+ VAE tiles) a session
  also holds its memory-pattern block: ``PATTERN_REPEAT`` x its first call's peak (1.0 now that the
  runtime turns the memory pattern off).
* UNet per call: ``UNET_K`` elements per (UNet batch x first block width x latent pixel), the UNet
  batch being 2 x batch with batched CFG; linear in pixels (LinFusion's attention is linear).
* VAE decode per call: ``VAE_K`` elements per (batch x width entering the last decoder block x
  decoded pixel) for the full-resolution convolutions, and ``ATTENTION_K`` x tokens^2 / windows for
  the mid-block's softmax attention over the decoded (tile) area (format-4 exports run it in query
  windows, ``ComponentSpec.attention_windows``), plus ``IMAGE_COPIES`` float32
  full-size images held by numpy. The VAE encoder (img2img) likewise, with the outer width.
* Activations count 4 bytes per element on ONNX Runtime whatever the export's precision, times
  ``CAST_OVERHEAD`` for fp16 components (its CPU kernels compute fp16 graphs through fp32 casts);
  the export's own element size on TensorRT.
* TensorRT (device memory): weights + the largest stage, since the engines share one context
  memory block and there is no memory pattern. Not calibrated: no TensorRT machine was available.

Torch-free and cheap: nothing here loads a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .available import (  # noqa: F401 - re-exported: the guard's API
    available_bytes,
    cgroup_available,
    gpu_available,
    host_available,
    parse_memory,
)

MIB = 2**20
GIB = 2**30

BASE = 128 * MIB
"""Interpreter, numpy, onnxruntime, tokenizers and PIL before any session, with room for the host:
the same tiny-sd generations peaked 10-13 MiB higher on the CI machine than on the one the constants
were fitted on (85-90 MiB measured there)."""
WEIGHT_FACTOR = 1.1
"""Resident bytes per byte of weights on disk: ORT copies the initializers and pre-packs some
(measured 1.06-1.10 on the fp32 sd15 export)."""
TEXT_PER_PROMPT = 8 * MIB
"""Text encoder arena per encoded prompt row (77 tokens; measured 2-6 MiB)."""
UNET_K = 88.0
"""Peak elements of one UNet call per (UNet batch x first block width x latent pixel)
(measured 73-74 tiny-sd, 78-82 sd15)."""
VAE_K = 6.1
"""Peak elements of one decoder call per (batch x vae_block_channels[1] x decoded pixel), for the
convolutions at full resolution (measured 5.4-6.4 tiny-sd, 4.5-6.0 sd15)."""
VAE_ENCODER_K = 7.2
"""Peak elements of one encoder call per (vae_block_channels[0] x encoded pixel) (measured 5.2-7.1
tiny-sd, 5.1 sd15)."""
ATTENTION_K = 2.4
"""Peak elements per (latent tokens)^2 of the VAE mid-block's softmax attention: scores and softmax
(measured 2.07-2.4 tiny-sd)."""
CONTROL_HEADS = {False: (8, 1), True: (10, 2)}
"""ControlNet self-attention (softmax, as the ControlNet ships it) at its largest level: heads and
the side divisor of that level, by SD-XL or not. SD-1.5: 8 heads at the latent size; SD-2.1 has 5
there (bounded by 8); SD-XL: 10 heads at half the latent side. The score matrix grows with the
square of the tokens, which is what dominates a ControlNet call at high resolution (about 15-17
GB were seen at 768-1024 px on SD-1.5 size, ORT CPU, docs/controlnet.md)."""
IMAGE_COPIES = 4.0
"""float32 full-size RGB images held at once after decode (output, tile accumulator, [0, 1], x255)."""
ENCODE_IMAGE_COPIES = 2.0
"""float32 full-size init images held while encoding (the [-1, 1] input, a tiled accumulator)."""
PATTERN_REPEAT = 1.0
"""Memory of a session after its second call with the same shapes, per first-call peak. 1.0: the
runtime turns ONNX Runtime's memory pattern off (backends/onnxruntime.py ``SESSION_DEFAULTS``); with
the pattern on it was measured at 1.8-2.0."""

CAST_OVERHEAD = 1.2
"""ONNX Runtime's x86 CPU kernels run fp16 graphs through casts to fp32: fp16 components' activations
counted as fp32 times this (measured 1.06 UNet, 1.16 VAE decoder against the fp32 tiny-sd export)."""

UNET_ALPHA_MIN = 1400.0
"""Smallest UNet parameters / first-width^2 among the presets (tiny-sd 1432; sd15 8394; sdxl 25073):
the fallback width sqrt(params / this) is never below the real one for them."""
VAE_BETA_MIN = 600.0
"""Smallest VAE decoder parameters / outer-width^2 among the presets (tiny 619; sd15/sdxl 3021)."""
UNIT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
STAGES = ("text", "unet", "controlnet", "vae_decode", "vae_encode")


class MemoryGuardError(ValueError):
    """A request whose estimated peak memory exceeds what is available: one line naming the remedy."""


@dataclass(frozen=True)
class Footprint:
    """What the estimate needs to know about one export."""

    weights: dict[str, int]
    """Bytes on disk per component (ONNX file + external data)."""
    element_size: dict[str, int]
    """Bytes per element of each component's tensors (4 fp32, 2 fp16)."""
    latent_channels: int
    vae_factor: int
    text_encoders: tuple[str, ...] = ("text_encoder",)
    unet_block_channels: tuple[int, ...] | None = None
    """diffusers' UNet block_out_channels; None for exports whose manifest lacks them."""
    vae_block_channels: tuple[int, ...] | None = None
    """diffusers' VAE block_out_channels (encoder order); None when the manifest lacks them."""
    xl: bool = False
    attention_windows: dict[str, int] = field(default_factory=dict)
    """Query windows of each component's softmax self-attention (manifest format 4); absent: whole."""
    shared_arena: bool = False
    """ONNX Runtime sessions share one CPU arena (the runtime's default): the stages' activations
    reuse one another's memory instead of each session keeping its own high-water mark."""

    @classmethod
    def from_export(cls, directory: str | Path, manifest: Any) -> Footprint:
        directory = Path(directory)
        weights, sizes = {}, {}
        for name, spec in manifest.components.items():
            files = [directory / spec.path]
            if spec.external_data:  # relative to the export directory (older: to the ONNX file)
                data = directory / spec.external_data
                files.append(data if data.is_file() else (directory / spec.path).parent / spec.external_data)
            weights[name] = sum(f.stat().st_size for f in files if f.is_file())
            sizes[name] = UNIT_BYTES.get(spec.precision, 4)
        facts = manifest.pipeline  # PipelineFacts (a plain dict in manifests read by older code)

        def get(key: str, default: Any = None) -> Any:
            return facts.get(key, default) if isinstance(facts, dict) else getattr(facts, key, default)

        def channels(key: str) -> tuple[int, ...] | None:
            value = get(key)
            return tuple(int(c) for c in value) if value else None

        windows = {name: spec.attention_windows for name, spec in manifest.components.items()
                   if getattr(spec, "attention_windows", None)}
        return cls(weights, sizes, int(get("latent_channels")), int(get("vae_scale_factor")),
                   tuple(get("text_encoders", ("text_encoder",))),
                   channels("unet_block_channels"), channels("vae_block_channels"), get("kind") == "sdxl",
                   windows)

    def windows(self, name: str) -> int:
        """Query windows of ``name``'s softmax attention (1: the whole score matrix at once)."""
        return max(1, self.attention_windows.get(name, 1))

    def unet_width(self) -> int:
        """The first UNet block's width, or a conservative stand-in from the weights size."""
        if self.unet_block_channels:
            return self.unet_block_channels[0]
        params = self.weights.get("unet", 0) / self.element_size.get("unet", 4)
        return max(math.ceil(math.sqrt(params / UNET_ALPHA_MIN)), 1)

    def vae_widths(self) -> tuple[int, int]:
        """The VAE's outer width and the next one (the upsampled input of the last decoder block)."""
        if self.vae_block_channels:
            chans = self.vae_block_channels
            return chans[0], chans[1] if len(chans) > 1 else chans[0]
        name = "vae_decoder" if "vae_decoder" in self.weights else "vae_encoder"
        params = self.weights.get(name, 0) / self.element_size.get(name, 4)
        outer = max(math.ceil(math.sqrt(params / VAE_BETA_MIN)), 1)
        return outer, 2 * outer


@dataclass
class Estimate:
    """Peak memory of one request in bytes, with where it comes from."""

    total: int
    weights: int
    activations: int
    stages: dict[str, int]
    """Activation bytes per stage: text, unet, vae_decode, vae_encode."""
    backend: str
    request: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        r = self.request
        size = f"{r.get('width')}x{r.get('height')}"
        parts = [f"UNet {gib(self.stages['unet'])} at {size} batch {r.get('unet_batch')}"]
        tile = r.get("vae_tile")
        parts.append(f"VAE decode {gib(self.stages['vae_decode'])}"
                     + (f" in {tile}x{tile} latent tiles" if tile else " untiled"))
        if self.stages.get("controlnet"):
            parts.append(f"ControlNet {gib(self.stages['controlnet'])}")
        if self.stages.get("vae_encode"):
            parts.append(f"VAE encode {gib(self.stages['vae_encode'])}")
        parts.append(f"weights {gib(self.weights)}")
        return f"about {gib(self.total)} ({', '.join(parts)})"


def gib(nbytes: float) -> str:
    if nbytes >= 1024 * GIB:
        return f"{nbytes / (1024 * GIB):.1f} TiB"
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / MIB:.0f} MiB"


def repeats(calls: float) -> float:
    """ORT's memory pattern: from the second call with the same shapes on, a session allocates the
    planned peak as one block beside the arena chunks of the first call, so its memory doubles."""
    return 1.0 if calls <= 1 else PATTERN_REPEAT


def vae_peak(convolutions: float, attention: float, reuse: bool) -> float:
    """Elements of a VAE call: the full-resolution convolutions and the mid-block attention run at
    different times, but the arena only reuses the freed attention chunks for the convolutions when a
    full-resolution tensor fits in half a chunk (tiny VAEs, huge tiles); otherwise both stay resident."""
    return max(convolutions, attention) if reuse else convolutions + attention


def estimate(footprint: Footprint, *, height: int, width: int, batch: int = 1, cfg: str = "batched",
             vae_tile: int | None = None, img2img: bool = False, backend: str = "onnxruntime",
             steps: int | None = None, vae_tile_batch: int = 1, vae_overlap: int | None = None,
             encodes: int = 1, controlnets: tuple[str, ...] = ()) -> Estimate:
    """Peak memory of one generation. ``cfg``: none, batched (UNet batch 2 x batch) or sequential;
    ``vae_tile``: the latent tile side when the VAE runs tiled, else None; ``backend``: onnxruntime
    (host RSS of the whole process) or tensorrt (device memory). ``steps``: UNet steps run; None
    (default) assumes more than one, which is the larger case (see ``repeats``). ``vae_tile_batch``:
    tiles per VAE call; ``vae_overlap``: their overlap in latent pixels (default: a quarter tile, at
    most ``runtime.vae.DEFAULT_OVERLAP``), laid out as ``runtime.vae.Tiling.spans`` lays them.
    ``encodes``: VAE encoder calls at the same size (inpainting may encode the init and the masked
    image; see ``runtime.inpaint``). ``controlnets``: the ControlNet components the request runs
    (``runtime.controlnet``): each keeps its own arena at its peak, convolutions as the UNet's plus
    the softmax attention of its largest level (``CONTROL_HEADS``)."""
    if cfg not in ("none", "batched", "sequential"):
        raise ValueError(f"cfg must be none, batched or sequential, got {cfg!r}")
    if min(height, width, batch) < 1 or (vae_tile is not None and vae_tile < 1):
        raise ValueError(f"height, width, batch and vae_tile must be positive, got {height}, {width}, {batch}, "
                         f"{vae_tile}")
    f = footprint
    trt = backend == "tensorrt"
    lat_h, lat_w = max(height // f.vae_factor, 1), max(width // f.vae_factor, 1)
    unet_batch = batch * (2 if cfg == "batched" else 1)
    unit = {name: f.element_size.get(name, 4) if trt else 4 * (CAST_OVERHEAD if f.element_size.get(name) == 2 else 1)
            for name in ("unet", "vae_decoder", "vae_encoder")}
    stages = dict.fromkeys(STAGES, 0)

    stages["text"] = int(TEXT_PER_PROMPT * batch * (1 if cfg == "none" else 2) * len(f.text_encoders))
    calls = (math.inf if steps is None else steps) * (2 if cfg == "sequential" else 1)
    stages["unet"] = int((1 if trt else repeats(calls)) * UNET_K * unet_batch * f.unet_width() * lat_h * lat_w
                         * unit["unet"])

    if controlnets:
        heads, divisor = CONTROL_HEADS[f.xl]
        tokens = (lat_h // divisor) * (lat_w // divisor)
        stages["controlnet"] = int((1 if trt else repeats(calls)) * unit["unet"] * sum(
            UNET_K * unet_batch * f.unet_width() * lat_h * lat_w
            + ATTENTION_K * unet_batch * heads * float(tokens) ** 2 / f.windows(name) for name in controlnets))

    outer, inner = f.vae_widths()
    tile_h, tile_w, tiles = lat_h, lat_w, 1
    if vae_tile:
        from .vae import DEFAULT_OVERLAP, Tiling

        overlap = min(DEFAULT_OVERLAP, vae_tile // 4) if vae_overlap is None else vae_overlap
        layout = Tiling(vae_tile, overlap)
        (rows, tile_h), (columns, tile_w) = layout.spans(lat_h), layout.spans(lat_w)
        tiles = len(rows) * len(columns)
    per_call = max(1, min(vae_tile_batch, tiles))  # tiles decoded together in one VAE call
    tile_px = tile_h * tile_w * f.vae_factor**2
    tokens2 = float(tile_h * tile_w) ** 2
    attention = ATTENTION_K * tokens2 / f.windows("vae_decoder")
    images = 0 if trt else IMAGE_COPIES * batch * 3 * height * width * 4  # host arrays, not device memory
    again = 1 if trt else repeats(math.ceil(tiles / per_call))
    decode = per_call * vae_peak(VAE_K * inner * tile_px, attention, 2 * inner * tile_px <= attention / ATTENTION_K)
    stages["vae_decode"] = int(again * batch * unit["vae_decoder"] * decode + images)
    if img2img:  # the init image is encoded once, then repeated to the batch
        attention = ATTENTION_K * tokens2 / f.windows("vae_encoder")
        encode = per_call * vae_peak(VAE_ENCODER_K * outer * tile_px, attention,
                                     2 * outer * tile_px <= attention / ATTENTION_K)
        again_encode = 1 if trt else repeats(math.ceil(tiles / per_call) * max(encodes, 1))
        stages["vae_encode"] = int(again_encode * unit["vae_encoder"] * encode
                                   + (0 if trt else ENCODE_IMAGE_COPIES * 3 * height * width * 4))

    loaded = [*f.text_encoders, "unet", "vae_decoder", *controlnets] + (["vae_encoder"] if img2img else [])
    disk = sum(f.weights.get(name, 0) for name in loaded)
    if trt:
        weights, activations, base = disk, max(stages.values()), 0
    elif f.shared_arena:  # one arena: the stages run one after another and reuse it (ControlNet with the UNet)
        weights, base = int(WEIGHT_FACTOR * disk), BASE
        activations = max(stages["text"], stages["unet"] + stages["controlnet"], stages["vae_decode"],
                          stages["vae_encode"])
    else:
        weights, activations, base = int(WEIGHT_FACTOR * disk), sum(stages.values()), BASE
    request = {"height": height, "width": width, "batch": batch, "cfg": cfg, "unet_batch": unet_batch,
               "vae_tile": vae_tile, "vae_tile_batch": per_call, "img2img": img2img, "steps": steps}
    return Estimate(int(base + weights + activations), weights, int(activations), stages, backend, request)


def check_fits(est: Estimate, limit_bytes: int) -> None:
    """Raise MemoryGuardError (one line) when the estimate exceeds ``limit_bytes``."""
    if est.total <= limit_bytes:
        return
    where = "of GPU memory " if est.backend == "tensorrt" else ""
    raise MemoryGuardError(
        f"this request needs {est.describe()}, {gib(max(limit_bytes, 0))} {where}are available; use a smaller "
        f"size, cfg_mode='sequential', tile_vae, or memory_limit=... (--memory-limit) to override")
