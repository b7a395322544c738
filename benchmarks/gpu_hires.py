"""GPU: the staged 16K chain (SDEdit upscaling) in PyTorch, each stage's time, peak memory and VAE share.

    python benchmarks/gpu_hires.py       # device session: sd15, 16384x8192, fp16, under 4 min on an H200
    python benchmarks/gpu_hires.py --preset tiny-sd --device cpu --target 512x256 --base 128x64 --steps 10

The chain the runtime runs (linfusion.runtime.hires), written the way a diffusers user would: the
``linfusion`` reference with seeded random weights (``load_pipeline(preset, random_weights=True)``),
``StableDiffusion(XL)Pipeline`` for stage 0 and ``StableDiffusion(XL)Img2ImgPipeline`` for each later
stage, one CPU ``torch.Generator`` through all stages, PIL bicubic resizes in between, the stages and
strengths from ``hires.stages`` (so the same rule as the runtime: 16384x8192 on SD-1.5 is 1024x512 and
0.4/0.3/0.2/0.1 of 50 steps). Per stage: seconds (CUDA synchronised), peak ``max_memory_allocated``,
and the seconds in the VAE encoder, the UNet and the VAE decoder (timed by wrapping ``vae.encode``,
``vae.decode`` and ``unet.forward``; the rest is text encoding, scheduler, pre/post-processing).

VAE: each stage uses the runtime's choice (runtime/vae.py ``choose_tiling``: tiles beyond twice the
native side, the tile edge from the memory budget for the dtype, an overlap of a fixed 8 latent
pixels), applied through diffusers' own attributes (``enable_tiling``, ``tile_sample_min_size``,
``tile_latent_min_size``, ``tile_overlap_factor`` = overlap / tile). diffusers has no batched tiles
(one decoder call per tile) and its own layout (fixed stride from the top left, smaller tiles at
the edges); the runtime's tiles per call and even layout are not applied. After the chain, the
VAE alone at the largest stages: the chain's latents decoded again with diffusers' default tiling
(``vae.config.sample_size`` px tiles, 0.25 overlap: 512 px on SD-1.5) and with the runtime's, and
untiled where the decoder's widest activation stays under 2^31 elements; PSNR of each tiled image
against the untiled one (or the default's). A comparison that would end past ``--deadline``
(225 s after the start; estimated from the chain's decode of that stage) is skipped, so the script
stays under 4 minutes where the chain takes about 2 (shared/GPU_RESULTS.md section 5: 116 s).

Writes --out (default results/gpu_hires.json) after the chain and again at the end, and the same
name with .md. Without CUDA it says so and exits 2 unless --device cpu.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from gpu_ort import use_checkout

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ATTRIBUTES = ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
NO_BATCHED_TILES = ("diffusers' AutoencoderKL runs one decoder/encoder call per tile and lays tiles out from the "
                    "top left with a fixed stride; the runtime's tiles per call (Tiling.batch) and its even layout "
                    "have no diffusers setting and are not applied here")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15", help="linfusion preset, random weights (default sd15)")
    p.add_argument("--target", default="16384x8192", help="final size WxH (default 16384x8192)")
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps of every stage (default 50)")
    p.add_argument("--base", help="hires base WxH (default: the runtime's auto rule)")
    p.add_argument("--strengths", help="img2img strength per upscale stage (default: 0.4 down to 0.1)")
    p.add_argument("--guidance", type=float, help="guidance scale (default 7.5 SD, 5.0 SD-XL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--vae-budget-gib", type=float, help="VAE budget of the tile choice (default: the runtime's)")
    p.add_argument("--compare-stages", type=int, default=4, help="VAE comparison at the last N stages (default 4)")
    p.add_argument("--deadline", type=float, default=225.0, help="seconds after which comparisons are skipped")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_hires.json")
    return p.parse_args(argv)


# --- helpers (unit-tested in tests/test_gpu_hires_script.py) ---------------------------------------

def model_facts(pipe: Any) -> dict[str, int]:
    """The numbers the exporter records for the runtime (export/exporter.py ``_pipeline_facts``)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    native = pipe.unet.config.sample_size * factor
    return {"vae_factor": factor, "native": native, "pixel_multiple": latent_multiple * factor,
            "native_latent": max(native // factor, latent_multiple),
            "vae_channels": pipe.vae.config.block_out_channels[0],
            # the decoder's widest tensor: the last upsampler's output, at full resolution
            "vae_widest_channels": pipe.vae.config.block_out_channels[min(1, len(pipe.vae.config.block_out_channels) - 1)]}


def diffusers_tiling(tile: int, overlap: int, factor: int) -> dict[str, Any]:
    """diffusers' attributes for tiles of ``tile`` latent pixels overlapping by ``overlap``: its
    decode steps by int(tile * (1 - f)) latent pixels and blends int(tile * factor * f) image
    pixels (encode: the same in image / latent pixels), so f = overlap / tile, nudged by an ulp
    where float rounding would make one of those truncations land one short."""
    size = tile * factor
    f = overlap / tile
    for _ in range(8):
        stride, blend, blend_enc = int(tile * (1 - f)), int(size * f), int(tile * f)
        if (stride, blend, blend_enc, int(size * (1 - f))) == (tile - overlap, overlap * factor, overlap,
                                                                (tile - overlap) * factor):
            return {"tile_sample_min_size": size, "tile_latent_min_size": tile, "tile_overlap_factor": f}
        f = math.nextafter(f, 1.0 if blend < overlap * factor or blend_enc < overlap else 0.0)
    raise ValueError(f"no diffusers overlap factor gives {overlap} of {tile} latent pixels")


def tile_calls(height: int, width: int, tile: int, factor: float) -> int:
    """Decoder calls of diffusers' decode of ``height`` x ``width`` latent pixels: tiled when a side
    exceeds the tile, then tiles start every int(tile * (1 - factor)) along both sides."""
    if height <= tile and width <= tile:
        return 1
    stride = int(tile * (1 - factor))
    return len(range(0, height, stride)) * len(range(0, width, stride))


def psnr(a: Any, b: Any, device: Any = None, rows: int = 1024) -> float | None:
    """PSNR in dB of two decoded images in [-1, 1] (host tensors), as images in [0, 1]; computed on
    ``device`` ``rows`` image rows at a time; None for identical images (or non-finite ones)."""
    total = 0.0
    for start in range(0, a.shape[-2], rows):
        x, y = (t[..., start:start + rows, :].to(device).float().div(2).add(0.5).clamp(0, 1) for t in (a, b))
        total += float((x - y).double().pow(2).sum())
    mse = total / a.numel()
    return None if mse == 0 or not math.isfinite(mse) else 10 * math.log10(1 / mse)


# --- measurement -----------------------------------------------------------------------------------

class Meter:
    """Seconds, calls and peak memory of ``vae.encode``, ``vae.decode``, ``unet.forward`` and the VAE
    decoder/encoder modules (one call per tile), by wrapping them; ``begin`` / ``end`` around a span."""

    def __init__(self, torch: Any, cuda: bool, pipe: Any) -> None:
        self.torch, self.cuda = torch, cuda
        self.parts: dict[str, dict[str, Any]] = {}
        self.peak, self.decoded, self.finite = 0, None, True
        vae, unet = pipe.vae, pipe.unet
        vae.encode = self._wrap("encode", vae.encode)
        vae.decode = self._wrap("decode", vae.decode)
        unet.forward = self._wrap("unet", unet.forward)
        for name in ("decoder", "encoder"):
            getattr(vae, name).register_forward_pre_hook(lambda *_, key=name: self._count(key))

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _peak(self, reset: bool = True) -> int:
        if not self.cuda:
            return 0
        peak = self.torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, peak)
        if reset:
            self.torch.cuda.reset_peak_memory_stats()
        return peak

    def _count(self, key: str) -> None:
        self.parts.setdefault(key + "_tiles", {"calls": 0})["calls"] += 1

    def _wrap(self, name: str, call: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            self._peak()
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.sync()
            part = self.parts.setdefault(name, {"seconds": 0.0, "calls": 0, "peak": 0})
            part["seconds"] += time.perf_counter() - start
            part["calls"] += 1
            part["peak"] = max(part["peak"], self._peak())
            if name == "decode":
                sample = out[0] if isinstance(out, tuple) else out.sample
                self.finite = self.finite and bool(self.torch.isfinite(sample).all())
                self.decoded = (args[0] if args else kwargs["z"], sample)
            return out
        return timed

    def begin(self) -> float:
        self.sync()
        self.parts, self.peak, self.finite = {}, 0, True
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def end(self, start: float) -> dict[str, Any]:
        self.sync()
        seconds = time.perf_counter() - start
        self._peak(reset=False)
        get = self.parts.get
        record = {"seconds": seconds, "peak_gib": self.peak / 2**30 if self.cuda else None, "finite": self.finite}
        for name in ("encode", "unet", "decode"):
            record[f"{name}_s"] = get(name, {}).get("seconds", 0.0)
            record[f"{name}_peak_gib"] = get(name, {}).get("peak", 0) / 2**30 if self.cuda else None
        record["unet_calls"] = get("unet", {}).get("calls", 0)
        record["decoder_tiles"] = get("decoder_tiles", {}).get("calls", 0)
        record["encoder_tiles"] = get("encoder_tiles", {}).get("calls", 0)
        record["other_s"] = seconds - record["encode_s"] - record["unet_s"] - record["decode_s"]
        return record


def set_tiling(vae: Any, attributes: dict[str, Any] | None) -> None:
    if attributes is None:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    for key in ATTRIBUTES:
        setattr(vae, key, attributes[key])


def stage_tilings(chain: list[Any], facts: dict[str, int], itemsize: int, budget: int) -> list[dict[str, Any] | None]:
    """The runtime's VAE tiling of each stage (runtime/vae.py), as diffusers attributes."""
    from linfusion.runtime import vae as rvae

    out = []
    for stage in chain:
        tiling = rvae.choose_tiling(stage.height // facts["vae_factor"], stage.width // facts["vae_factor"], None,
                                    facts["native_latent"], facts["vae_factor"], facts["vae_channels"], itemsize,
                                    budget)
        out.append(None if tiling is None else {
            **diffusers_tiling(tiling.tile, tiling.overlap, facts["vae_factor"]),
            "runtime": {"tile_px": tiling.tile * facts["vae_factor"], "overlap_px": tiling.overlap * facts["vae_factor"],
                        "tiles_per_call": tiling.batch}})
    return out


def run_chain(torch: Any, loaded: Any, args: argparse.Namespace, chain: list[Any], tilings: list[Any],
              meter: Meter, guidance: float, records: list[dict[str, Any]]) -> dict[int, Any]:
    """The chain, stage by stage, a record per stage appended to ``records`` as it ends; returns each
    stage's decoded (latents, image) on the host."""
    import diffusers
    import numpy as np
    from PIL import Image

    base = loaded.pipeline
    img2img = getattr(diffusers, "StableDiffusionXLImg2ImgPipeline" if loaded.is_xl
                      else "StableDiffusionImg2ImgPipeline")(**base.components)
    for pipe in (base, img2img):
        pipe.set_progress_bar_config(disable=True)
    warm = torch.Generator("cpu").manual_seed(args.seed + 1)  # kernels, allocator and cuDNN plans at the base size
    base(PROMPT, width=chain[0].width, height=chain[0].height, num_inference_steps=2, guidance_scale=guidance,
         generator=warm)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    decoded, image = {}, None
    for stage, tiling in zip(chain, tilings):
        resize = 0.0
        if image is not None:
            start = time.perf_counter()
            image = image.resize((stage.width, stage.height), resample=Image.BICUBIC)
            resize = time.perf_counter() - start
        set_tiling(base.vae, tiling)
        start = meter.begin()
        if stage.strength is None:
            out = base(PROMPT, width=stage.width, height=stage.height, num_inference_steps=stage.steps,
                       guidance_scale=guidance, generator=generator)
        else:
            out = img2img(PROMPT, image=image, strength=stage.strength, num_inference_steps=stage.steps,
                          guidance_scale=guidance, generator=generator)
        record = meter.end(start)
        image = out.images[0]
        latents, sample = meter.decoded
        decoded[stage.index] = (latents.cpu(), sample.cpu())
        meter.decoded = None
        del out, latents, sample
        gc.collect()
        if meter.cuda:
            torch.cuda.empty_cache()
        records.append({"stage": stage.index, "width": stage.width, "height": stage.height,
                        "strength": stage.strength, "steps": stage.steps,
                        "denoising_steps": stage.steps if stage.strength is None else int(stage.steps * stage.strength),
                        "resize_s": resize, **record,
                        "vae_tiling": None if tiling is None else {k: tiling[k] for k in (*ATTRIBUTES, "runtime")}})
        print(f"stage {stage.index} {stage.width}x{stage.height}: {record['seconds']:.2f} s (encode "
              f"{record['encode_s']:.2f}, UNet {record['unet_s']:.2f}, decode {record['decode_s']:.2f}), peak "
              f"{record['peak_gib'] or 0:.1f} GiB", flush=True)
    pixels = np.asarray(image)[::8, ::8].astype(np.float64)
    records[-1]["image_mean"], records[-1]["image_std"] = float(pixels.mean()), float(pixels.std())
    return decoded


def compare_vae(torch: Any, vae: Any, meter: Meter, chain: list[Any], tilings: list[Any], decoded: dict[int, Any],
                records: list[dict[str, Any]], defaults: dict[str, Any], facts: dict[str, int],
                args: argparse.Namespace, started: float) -> list[dict[str, Any]]:
    """The chain's latents of the last stages (largest first) decoded with diffusers' default
    tiling, the runtime's again where it tiles, and untiled where the decoder's widest tensor stays
    under 2^31 elements; seconds, peak, tiles, PSNR (None: identical images). A decode that would end past the deadline (estimated
    from the chain's decode of that stage) is skipped."""
    rows: list[dict[str, Any]] = []
    device = next(vae.parameters()).device
    for stage in chain[-args.compare_stages:][::-1]:
        latents, chain_image = decoded[stage.index]
        latents = latents.to(device, vae.dtype)  # an SD-XL chain may have decoded upcast to float32
        lat_h, lat_w = latents.shape[-2:]
        settings = [("default", {**defaults})]
        if tilings[stage.index] is not None:  # else the runtime decodes untiled
            settings.append(("runtime", tilings[stage.index]))
        if facts["vae_widest_channels"] * stage.width * stage.height < 2**31:
            settings.append(("untiled", None))
        images, first = {}, len(rows)
        for name, tiling in settings:
            row = {"stage": stage.index, "width": stage.width, "height": stage.height, "setting": name,
                   "tile_px": None if tiling is None else tiling["tile_sample_min_size"],
                   "overlap_factor": None if tiling is None else tiling["tile_overlap_factor"]}
            estimate = 2 * records[stage.index]["decode_s"]
            if time.perf_counter() - started + estimate > args.deadline:
                rows.append({**row, "skipped": f"would pass the {args.deadline:.0f} s deadline"})
                continue
            set_tiling(vae, tiling)
            try:
                with torch.no_grad():
                    start = meter.begin()
                    image = vae.decode(latents, return_dict=False)[0]
                    record = meter.end(start)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                rows.append({**row, "error": str(exc).splitlines()[0][:200]})
                continue
            images[name] = image.cpu()
            del image
            row.update(seconds=record["seconds"], peak_gib=record["peak_gib"], finite=record["finite"],
                       decoder_tiles=record["decoder_tiles"])
            if tiling is not None:
                row["expected_tiles"] = tile_calls(lat_h, lat_w, tiling["tile_latent_min_size"],
                                                   tiling["tile_overlap_factor"])
            rows.append(row)
            print(f"VAE decode {stage.width}x{stage.height} {name}: {record['seconds']:.2f} s, "
                  f"{record['decoder_tiles']} tiles, peak {record['peak_gib'] or 0:.1f} GiB", flush=True)
        reference = "untiled" if "untiled" in images else "default"
        for row in rows[first:]:
            if row["setting"] in images and row["setting"] != reference and reference in images:
                row["psnr_vs"], row["psnr_db"] = reference, psnr(images[row["setting"]], images[reference], device)
            if row["setting"] == "runtime" and "runtime" in images:  # the chain's own decode, same latents
                row["psnr_vs_chain_db"] = psnr(images["runtime"], chain_image, device)  # None: identical
        del images, latents
        gc.collect()
    return rows


def markdown(record: dict[str, Any]) -> str:
    stages = harness.markdown_table(
        ["stage", "size", "strength", "steps run", "seconds", "encode s", "UNet s", "decode s", "other s",
         "peak GiB", "VAE tile px"],
        [[r["stage"], f"{r['width']}x{r['height']}", r["strength"], r["denoising_steps"], r["seconds"],
          r["encode_s"], r["unet_s"], r["decode_s"], r["other_s"] + r["resize_s"], r["peak_gib"],
          r["vae_tiling"] and r["vae_tiling"]["tile_sample_min_size"]] for r in record["stages"]]
        + [["**total**", "", "", "", record["total_s"], "", "", "", "", "", ""]])
    vae = harness.markdown_table(
        ["size", "setting", "tile px", "overlap", "decode s", "tiles", "peak GiB", "PSNR dB (vs)"],
        [[f"{r['width']}x{r['height']}", r["setting"], r["tile_px"], r["overlap_factor"],
          r.get("seconds"), r.get("decoder_tiles"), r.get("peak_gib"),
          r.get("skipped") or r.get("error") or (f"{r['psnr_db']:.1f} ({r['psnr_vs']})" if r.get("psnr_db") else None)]
         for r in record["vae_compare"]])
    m = record["machine"]
    return "\n\n".join([
        f"### gpu_hires ({record['date'][:10]})", f"Command: `{record['command']}`",
        f"Machine: {m.get('gpu')}, {m['cpu']}, {m['cores']} cores; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        (f"{record['settings']['preset']} (random weights), {record['settings']['dtype']}, "
        f"{record['settings']['steps']} steps, guidance {record['settings']['guidance']}, "
        f"scheduler {record['settings']['scheduler']}; the runtime's VAE tiling per stage."), stages,
        "VAE decode alone, the chain's latents:", vae, *(f"- {n}" for n in record["notes"])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    try:
        import torch
    except ImportError:
        print("gpu_hires: needs torch (with CUDA, or --device cpu); nothing measured.")
        return 2
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_hires: no CUDA GPU visible; run this in a device session, or pass --device cpu. Nothing measured.")
        return 2
    how = use_checkout()
    from linfusion.runtime import hires
    from linfusion.runtime import vae as rvae
    from linfusion.runtime.request import GenerationError

    import linfusion

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or
                                                                                   ("fp16" if cuda else "fp32")]
    loaded = linfusion.load_pipeline(args.preset, random_weights=True, dtype=dtype, seed=args.seed)
    pipe = loaded.pipeline.to(args.device)
    facts = model_facts(pipe)
    guidance = args.guidance if args.guidance is not None else (5.0 if loaded.is_xl else 7.5)
    try:
        width, height = hires.Hires.parse_size(args.target)
        plan = hires.Hires.parse("auto", args.base, args.strengths)
        chain = hires.stages(plan, width, height, args.steps, facts["native"], facts["pixel_multiple"])
    except GenerationError as exc:
        print(f"gpu_hires: {exc}")
        return 2
    budget = int(args.vae_budget_gib * 2**30) if args.vae_budget_gib else rvae.DEFAULT_BUDGET
    tilings = stage_tilings(chain, facts, torch.empty((), dtype=dtype).element_size(), budget)
    defaults = {key: getattr(pipe.vae, key) for key in ATTRIBUTES}
    meter = Meter(torch, cuda, pipe)
    load_s = time.perf_counter() - started
    machine = harness.machine()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        machine.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    record: dict[str, Any] = {
        "study": "gpu_hires", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": harness.command_line(), "machine": machine, "linfusion_import": how,
        "settings": {"preset": args.preset, "target": [width, height], "steps": args.steps, "guidance": guidance,
                     "seed": args.seed, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                     "scheduler": type(pipe.scheduler).__name__, "prompt": PROMPT, "vae_budget_bytes": budget,
                     "generator": "one torch.Generator('cpu') through all stages", **facts},
        "diffusers_default_tiling": defaults, "load_s": load_s,
        "notes": [NO_BATCHED_TILES, ("times exclude the warm-up (stage 0's size, 2 steps); other_s includes the "
                  "PIL resize before the stage, text encoding, scheduler and pre/post-processing")]}
    record["stages"] = []
    try:
        decoded = run_chain(torch, loaded, args, chain, tilings, meter, guidance, record["stages"])
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # keep the stages that ran
        record["error"] = f"stage {len(record['stages'])}: {str(exc).splitlines()[0][:300]}"
        record.update(total_s=None, vae_compare=[])
        write(args.out, record)
        print(f"gpu_hires: {record['error']}")
        return 1
    record["total_s"] = sum(r["seconds"] + r["resize_s"] for r in record["stages"])
    record["vae_compare"] = []
    write(args.out, record)
    record["vae_compare"] = compare_vae(torch, pipe.vae, meter, chain, tilings, decoded, record["stages"], defaults,
                                        facts, args, started)
    record["elapsed_s"] = time.perf_counter() - started
    write(args.out, record)
    return 0 if all(r["finite"] for r in record["stages"]) else 1


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    path.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {path} and {path.with_suffix('.md').name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
