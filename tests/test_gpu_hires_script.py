"""benchmarks/gpu_hires.py, the staged 16K chain on CUDA, checked without a GPU.

The diffusers tiling attributes against diffusers' own tiled decode (a stub decoder counts the
tiles); the refusal without CUDA; and the whole script on the CPU with tiny-sd at a tiny target:
its JSON against the chain derived by hand (sizes, strengths, steps run), the tile counts derived
by hand from diffusers' layout, positive timings and finite images.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_hires.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbours harness and gpu_ort
try:
    gh = importlib.import_module("gpu_hires")
finally:  # benchmarks/ off the path again (its memory.py, models.py would shadow other modules)
    while str(SCRIPT.parent) in sys.path:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize("tile,side,per_side", [(49, 161, 4), (104, 300, 4), (128, 2048, 18), (32, 64, 3)])
def test_diffusers_tiling_steps_by_tile_minus_overlap(tile, side, per_side):
    """diffusers' tiled decode with the attributes for an 8-latent-pixel overlap steps by tile - 8:
    ceil(side / (tile - 8)) tiles along a side (hand-counted: 161 / 41 -> 4, 300 / 96 -> 4,
    2048 / 120 -> 18, 64 / 24 -> 3), where 8 / 49 as such would step by 40 (161 -> 5 tiles)."""
    from diffusers import AutoencoderKL

    attrs = gh.diffusers_tiling(tile, 8, 8)
    assert attrs["tile_latent_min_size"] == tile and attrs["tile_sample_min_size"] == 8 * tile
    assert abs(attrs["tile_overlap_factor"] - 8 / tile) < 1e-12
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    calls = []

    class Stub(torch.nn.Module):  # the decoder of a factor-8 VAE, one call per tile
        def forward(self, z):
            calls.append(tuple(z.shape[-2:]))
            return torch.nn.functional.interpolate(z[:, :3], scale_factor=8)

    vae.decoder = Stub()
    gh.set_tiling(vae, attrs)
    with torch.no_grad():
        out = vae.decode(torch.zeros(1, 4, side, 24)).sample
    assert len(calls) == per_side  # one tile across the 24 latent pixels of width
    assert out.shape[-2:] == (8 * side, 8 * 24)
    assert gh.tile_calls(side, 24, tile, attrs["tile_overlap_factor"]) == per_side


def test_default_tiling_counts_and_psnr():
    assert gh.tile_calls(128, 64, 64, 0.25) == 3 * 2  # stride 48: rows 0, 48, 96; columns 0, 48
    assert gh.tile_calls(64, 64, 64, 0.25) == 1
    a = torch.zeros(1, 3, 8, 8)
    assert gh.psnr(a, a + 0.2) == pytest.approx(20.0)  # [0, 1] images differ by 0.1: MSE 0.01
    assert gh.psnr(a, a) is None


def test_without_cuda_it_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert gh.main(["--preset", "tiny-sd", "--out", "/nonexistent/x.json"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_the_chain_on_the_cpu(tmp_path):
    """tiny-sd (native 128 px, sides in multiples of 32), 512x256 from a 128x64 base: stages 128x64
    text-to-image, 256x128 at 0.4 and 512x256 at 0.1 of 10 steps (4 and 1 run). The runtime tiles
    the VAE beyond 32 x 32 latent pixels by area, so only 512x256 (64 x 32 latents): tiles of 32
    latent pixels (the budget's cap, twice the native 16) overlapping by min(8, 16 // 4) = 4, as
    diffusers steps 28: decode 2 x 3 tiles, encode (256 px tiles, step 224 px over 256 x 512) 2 x 3.
    diffusers' default (tiny-sd's VAE sample_size 128: 16-pixel latent tiles, step 12): 3 x 6 = 18."""
    out = tmp_path / "gpu_hires.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny-sd", "--device", "cpu", "--target",
                           "512x256", "--base", "128x64", "--steps", "10", "--compare-stages", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    def refuse(name):
        raise ValueError(f"non-finite number {name}")

    record = json.loads(out.read_text(), parse_constant=refuse)
    assert out.with_suffix(".md").read_text().count("\n| ") >= 8
    stages = record["stages"]
    assert [(s["width"], s["height"], s["strength"], s["steps"], s["denoising_steps"]) for s in stages] == [
        (128, 64, None, 10, 10), (256, 128, 0.4, 10, 4), (512, 256, 0.1, 10, 1)]
    from linfusion.runtime.hires import Hires
    from linfusion.runtime.hires import stages as hires_stages

    assert [(s.width, s.height, s.strength) for s in hires_stages(Hires(base=(128, 64)), 512, 256, 10, 128, 32)] \
        == [(s["width"], s["height"], s["strength"]) for s in stages]
    for s in stages:
        assert s["finite"] and s["seconds"] > 0 and s["unet_s"] > 0 and s["decode_s"] > 0 and s["unet_calls"] >= 1
        assert s["encode_s"] + s["unet_s"] + s["decode_s"] <= s["seconds"]
        assert (s["encode_s"] > 0) == (s["strength"] is not None)
    assert [s["vae_tiling"] and s["vae_tiling"]["tile_latent_min_size"] for s in stages] == [None, None, 32]
    assert stages[2]["vae_tiling"]["tile_overlap_factor"] == 4 / 32
    assert [(s["decoder_tiles"], s["encoder_tiles"]) for s in stages] == [(1, 0), (1, 1), (6, 6)]
    assert 0 < stages[-1]["image_std"] and 0 <= stages[-1]["image_mean"] <= 255
    assert record["total_s"] >= sum(s["seconds"] for s in stages)

    rows = {(r["width"], r["setting"]): r for r in record["vae_compare"]}
    assert {key: r["decoder_tiles"] for key, r in rows.items()} == {
        (512, "default"): 18, (512, "runtime"): 6, (512, "untiled"): 1,
        (256, "default"): 2 * 3, (256, "untiled"): 1}  # the runtime decodes 256x128 untiled: no row
    for r in rows.values():
        assert r["seconds"] > 0 and r["finite"] and r.get("expected_tiles", r["decoder_tiles"]) == r["decoder_tiles"]
    assert rows[512, "runtime"]["psnr_db"] > 0 and rows[512, "runtime"]["psnr_vs"] == "untiled"
    assert rows[512, "runtime"]["psnr_vs_chain_db"] is None  # the chain's own decode, bit for bit
