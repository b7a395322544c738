"""The memory guard (runtime/memory.py): refusal, parsing, available memory, and the estimate
against a measured peak RSS of a real generation."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from linfusion.runtime.memory import (
    Footprint,
    MemoryGuardError,
    available_bytes,
    cgroup_available,
    check_fits,
    estimate,
    parse_memory,
)
from linfusion.runtime.vae import choose_tiling
from peak_rss import peak_rss_of_cli

GIB = 2**30

# SD-1.5's sizes, from diffusers' configs (linfusion/configs/sd15) and the fp32 export's file sizes.
SD15 = Footprint(weights={"text_encoder": 491_993_203, "unet": 3_636_949_672, "vae_decoder": 197_955_511,
                          "vae_encoder": 136_659_390},
                 element_size={"text_encoder": 4, "unet": 4, "vae_decoder": 4, "vae_encoder": 4},
                 latent_channels=4, vae_factor=8, unet_block_channels=(320, 640, 1280, 1280),
                 vae_block_channels=(128, 256, 512, 512))


def mem_total() -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def test_the_issue_request_is_refused_in_one_line():
    """100000x100000 (the issue's request): its float32 image alone is 3 x 4 x 10^10 bytes = 112 GiB."""
    est = estimate(SD15, height=100_000, width=100_000, batch=1, cfg="batched", vae_tile=64, img2img=False,
                   backend="onnxruntime")
    assert est.total >= 3 * 4 * 100_000**2
    assert est.total == est.weights + est.activations + (est.total - est.weights - est.activations)
    with pytest.raises(MemoryGuardError) as info:
        check_fits(est, available_bytes("onnxruntime"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("this request needs about ")
    assert "are available" in message and "memory_limit=" in message and "sequential" in message
    assert "100000x100000" in message


def test_a_request_that_fits_passes_and_the_limit_is_the_boundary():
    est = estimate(SD15, height=512, width=512, batch=1, cfg="batched", vae_tile=None, img2img=False,
                   backend="onnxruntime")
    check_fits(est, est.total)
    with pytest.raises(MemoryGuardError, match=r"are available"):
        check_fits(est, est.total - 1)


def test_estimate_grows_with_size_batch_and_cfg_and_tiling_bounds_the_vae():
    def total(**kw):
        args = {"height": 1024, "width": 1024, "batch": 1, "cfg": "batched", "vae_tile": None,
                "img2img": False, "backend": "onnxruntime"}
        return estimate(SD15, **{**args, **kw})

    assert total(height=2048, width=2048).total > total().total
    assert total(batch=2).stages["unet"] == 2 * total().stages["unet"]
    assert total(cfg="none", steps=1).stages["unet"] * 2 == total(cfg="batched", steps=1).stages["unet"]
    assert total(vae_tile=64).stages["vae_decode"] < total().stages["vae_decode"]
    assert total(img2img=True).stages["vae_encode"] > 0 == total().stages["vae_encode"]
    # Without the architecture widths (older manifests) the estimate may only be larger.
    old = Footprint(SD15.weights, SD15.element_size, 4, 8)
    assert estimate(old, height=1024, width=1024).total >= total().total


@pytest.mark.parametrize("text, expected", [
    ("12G", 12 * 2**30), ("800M", 800 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("2048", 2048),
    ("512k", 512 * 1024), ("2GB", 2 * 10**9), (" 3 gib ", 3 * 2**30), ("1T", 2**40), (4096, 4096),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "12X", "G", "-1G", "0", "1.2.3G", "twelve"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(ValueError, match="12G"):
        parse_memory(text)


def test_available_bytes_is_positive_and_at_most_physical_memory():
    available = available_bytes("onnxruntime")
    assert 0 < available <= mem_total()
    assert available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_cgroup_limits_v2_and_v1(tmp_path):
    """Fake cgroup trees: limit - (usage - inactive page cache), the tightest ancestor wins."""
    v2 = tmp_path / "v2"
    (v2 / "a" / "b").mkdir(parents=True)
    (v2 / "a" / "memory.max").write_text(f"{8 * GIB}\n")
    (v2 / "a" / "memory.current").write_text(f"{3 * GIB}\n")
    (v2 / "a" / "memory.stat").write_text(f"anon 1\ninactive_file {GIB}\n")
    (v2 / "a" / "b" / "memory.max").write_text("max\n")
    (v2 / "a" / "b" / "memory.current").write_text(f"{GIB}\n")
    proc = tmp_path / "cgroup2"
    proc.write_text("0::/a/b\n")
    assert cgroup_available(v2, proc) == 8 * GIB - 2 * GIB

    v1 = tmp_path / "v1" / "memory" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    (v1 / "memory.stat").write_text("total_inactive_file 0\n")
    proc.write_text("4:memory:/job\n3:cpu:/\n")
    assert cgroup_available(tmp_path / "v1", proc) == 3 * GIB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_available(tmp_path / "v1", proc) is None


@pytest.fixture(scope="module")
def tiny_export(exported):
    """tiny-sd exported once per test session."""
    return exported("tiny-sd")


@pytest.mark.slow
def test_footprint_reads_the_export(tiny_export):
    from linfusion.runtime.manifest import load_manifest

    footprint = Footprint.from_export(tiny_export, load_manifest(tiny_export))
    for name in ("text_encoder", "unet", "vae_decoder"):
        # the ONNX file and its external data; not the LoRA initializer map (lora_map.json)
        assert footprint.weights[name] == sum(p.stat().st_size for p in (tiny_export / name).iterdir()
                                              if p.suffix != ".json")
    assert footprint.latent_channels == 4 and footprint.vae_factor == 8
    assert footprint.unet_block_channels in (None, (32, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("side, steps, cfg, tile", [(512, 2, "batched", 16), (256, 1, "sequential", None)])
def test_estimate_bounds_a_measured_generation(tiny_export, tmp_path, side, steps, cfg, tile):
    """A whole tiny-sd generation by the CLI in a fresh process: measured <= estimate <= 1.5 x measured."""
    from linfusion.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from linfusion.runtime.manifest import load_manifest

    footprint = Footprint.from_export(tiny_export, load_manifest(tiny_export))
    footprint = replace(footprint, shared_arena=OnnxRuntimeBackend().shares_cpu_arena())  # as the CLI runs
    if footprint.unet_block_channels is None:  # manifests before the widths: take them from the preset
        configs = Path(__file__).resolve().parents[1] / "linfusion" / "configs" / "tiny-sd"
        widths = {key: tuple(json.loads((configs / folder / "config.json").read_text())["block_out_channels"])
                  for key, folder in (("unet_block_channels", "unet"), ("vae_block_channels", "vae"))}
        footprint = Footprint(**{**footprint.__dict__, **widths})
    measured = peak_rss_of_cli([str(tiny_export), "--prompt", "x", "--height", str(side), "--width", str(side),
                                "--steps", str(steps), "--seed", "0", "--scheduler", "euler",
                                "--cfg-mode", cfg, "--tile-vae", str(tile * 8) if tile else "off",
                                "--hires", "off", "--backend", "onnxruntime", "--output", str(tmp_path / "out.png")],
                               tmp_path / "peak")
    # The tiles as the runtime lays them out: a fixed overlap, as many per VAE call as its budget allows.
    tiling = choose_tiling(side // 8, side // 8, tile * 8, 16, 8, footprint.vae_block_channels[0]) if tile else None
    est = estimate(footprint, height=side, width=side, batch=1, cfg=cfg, vae_tile=tile, img2img=False,
                   backend="onnxruntime", steps=steps, vae_tile_batch=tiling.batch if tiling else 1,
                   vae_overlap=tiling.overlap if tiling else None)
    assert measured <= est.total <= 1.5 * measured, (measured / 2**20, est.describe())


def test_the_guard_imports_without_torch_or_a_model_library():
    """The guard must be cheap to run before anything loads: no torch, no onnxruntime, no numpy."""
    from torchless import run_without_torch

    result = run_without_torch("""
        import sys
        import linfusion.runtime.memory as memory
        assert memory.available_bytes("onnxruntime") > 0
        assert_torch_free()
        print(sorted(m for m in ("onnxruntime", "numpy") if m in sys.modules))
    """, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("xl, heads, side_divisor", [(False, 8, 1), (True, 10, 2)])
def test_a_controlnet_adds_its_softmax_attention_and_weights(xl, heads, side_divisor):
    """ControlNets keep softmax attention: at 1024 px the score matrices alone (scores and their
    softmax, float32, batched guidance) dwarf the LinFusion UNet; the guard must see them."""
    weights = {"text_encoder": 10**8, "unet": 10**9, "vae_decoder": 10**8, "controlnet": 4 * 10**8}
    footprint = Footprint(weights, {}, 4, 8, ("text_encoder",), (320, 640, 1280, 1280), (128, 256, 512, 512), xl)
    plain = estimate(footprint, height=1024, width=1024, steps=20)
    control = estimate(footprint, height=1024, width=1024, steps=20, controlnets=("controlnet",))
    tokens = (1024 // 8 // side_divisor) ** 2
    scores = 2 * heads * tokens**2 * 4  # UNet batch 2 (batched CFG), float32
    assert control.total - plain.total >= 2 * scores + 1.1 * weights["controlnet"]
    assert control.stages["controlnet"] >= 2 * scores and "ControlNet" in control.describe()
    two = estimate(footprint, height=1024, width=1024, steps=20, controlnets=("controlnet", "controlnet_1"))
    assert two.stages["controlnet"] == pytest.approx(2 * control.stages["controlnet"], abs=2)  # an arena each
