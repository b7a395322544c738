"""The memory guard in the pipeline and the CLI: refusal before any model runs, sequential CFG fallback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from linfusion.runtime import memory


@pytest.fixture(scope="module")
def pipe(exported):
    from linfusion.runtime import Pipeline

    return Pipeline.from_export(exported("tiny-sd"))


@pytest.mark.parametrize("size, extra, words", [
    (100000, [], "beyond this export's maximum size"),  # the export's size limit answers first
    (8192, ["--hires", "off", "--memory-limit", "2G"], "needs about"),  # within it: the memory guard
])
def test_cli_refuses_a_huge_request_at_once(exported, tmp_path, size, extra, words):
    """Issue: 100000x100000 grew to 23.5 GB and was killed by the OOM killer after 89 s."""
    args = [str(exported("tiny-sd")), "--prompt", "x", "--height", str(size), "--width", str(size), "--steps", "1",
            "--output", str(tmp_path / "o.png"), *extra]
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('peak_kib', open('/proc/self/status').read().split('VmHWM:')[1].split()[0],"
            " file=sys.stderr))\n"
            f"from linfusion.runtime.cli import main\nsys.exit(main({args!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    peak_kib = int(err.pop().split()[1])
    assert len(err) == 1 and words in err[0], err
    if words == "needs about":
        assert "available" in err[0] and "--memory-limit" in err[0]
    assert peak_kib < 1024 * 1024, f"the refused request still used {peak_kib} KiB"
    assert not (tmp_path / "o.png").exists()


def test_memory_limit_refuses_before_any_model_runs(pipe, monkeypatch):
    from linfusion.runtime import GenerationError

    calls = []
    monkeypatch.setattr(pipe.text, "encode_pair", lambda *a, **k: calls.append(1))
    with pytest.raises(GenerationError, match="needs about .* 1 MiB are available"):
        pipe("x", height=64, width=64, num_inference_steps=1, memory_limit="1M")
    assert not calls
    with pytest.raises(GenerationError, match="memory"):
        pipe("x", height=64, width=64, num_inference_steps=1, memory_limit="lots")


def test_batched_guidance_falls_back_to_sequential_when_only_that_fits(pipe):
    from linfusion.runtime.request import GenerationRequest

    # With one shared arena the peak is the largest stage, so the guidance mode matters where the UNet's is
    # the largest: a tiled VAE (a whole tiny-sd decode outweighs its UNet at any size).
    request = dict(prompt="a red cube", height=768, width=768, num_inference_steps=2, seed=5, output_type="np",
                   scheduler="euler", tile_vae=128)
    batched = pipe._estimate(pipe.plan(GenerationRequest(**request, memory_limit="64G")), "batched").total
    sequential = pipe._estimate(pipe.plan(GenerationRequest(**request, memory_limit="64G")), "sequential").total
    assert sequential < batched
    limit = (batched + sequential) // 2
    plan = pipe.plan(GenerationRequest(**request, memory_limit=limit))
    assert plan.cfg_mode == "sequential" and plan.memory.total <= limit
    got = pipe(**request, memory_limit=limit).images
    want = pipe(**request, cfg_mode="sequential", memory_limit="64G").images
    np.testing.assert_array_equal(got, want)


def test_pipeline_footprint_reads_the_typed_facts(pipe, exported):
    import json
    from pathlib import Path

    config = json.loads((Path(memory.__file__).parents[1] / "linfusion/configs/tiny-sd/unet/config.json").read_text())
    assert pipe.footprint.unet_block_channels == tuple(config["block_out_channels"])
    assert pipe.footprint.weights["unet"] == (exported("tiny-sd") / "unet" / "model.onnx").stat().st_size
