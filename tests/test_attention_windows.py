"""The softmax self-attention over query windows (export/attention_windows.py): the same numbers as
PyTorch's own attention at any token count, and no token x token score matrix in the exported graph."""

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from linfusion.export import attention_windows, chunking
from linfusion.export.components import build_component
from linfusion.runtime.contract.components import component_kind
from linfusion.runtime.manifest import load_manifest
from linfusion.runtime.memory import ATTENTION_K, Footprint, estimate


@pytest.fixture(scope="module")
def decoder(tiny_sd):
    return build_component(component_kind("vae_decoder"), tiny_sd.pipeline, False, 8, torch.float32, "vae_decoder")


def test_only_softmax_self_attention_is_windowed(tiny_sd, decoder):
    # the wrapper holds the whole VAE; only what the decoder's pass calls gets windows
    assert sorted(attention_windows.targets(decoder.module)) == ["decoder.mid_block.attentions.0",
                                                                  "encoder.mid_block.attentions.0"]
    unet = build_component(component_kind("unet"), tiny_sd.pipeline, False, 8, torch.float32, "unet")
    assert attention_windows.targets(unet.module) == []  # attn1 is LinFusion's, attn2 cross-attention
    plan = attention_windows.plan(decoder)
    tokens = math.prod(decoder.trace_size)
    assert plan == {"decoder.mid_block.attentions.0": min(attention_windows.QUERY_WINDOWS, tokens // 2)}


@pytest.mark.parametrize("latent", [(3, 5), (4, 4), (9, 7), (16, 24)])  # 15 < 16 windows, exact, ragged, traced
def test_windows_equal_pytorch_attention(decoder, latent, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(0))

    def run():
        out = decoder.module(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).double()

    with torch.no_grad():
        expected = run()
        calls.clear()
        with attention_windows.applied(decoder.module, {"decoder.mid_block.attentions.0": 16}) as count:
            got = run()
    assert count == 1
    tokens = latent[0] * latent[1]
    assert calls == [math.ceil(tokens / 16)] * 16  # 16 windows of the padded queries
    assert F.scaled_dot_product_attention is counting  # restored
    by_name = {name: module for module, name in chunking.display_names(decoder.module).items()}
    assert "forward" not in vars(by_name["decoder.mid_block.attentions.0"])
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def _softmax_outputs(path: Path, feed: dict, tmp_path: Path) -> list[int]:
    """Element counts of every Softmax output in one ORT run (graph optimisations off: nodes as exported)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    return [math.prod(next(iter(s.values()))) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("op_name") == "Softmax"
            for s in e["args"]["output_type_shape"]]


@pytest.mark.slow
def test_export_has_no_full_score_matrix_and_matches_diffusers(exported, tiny_sd, tmp_path):
    export = exported("tiny-sd")
    manifest = load_manifest(export)
    windows = {name: spec.attention_windows for name, spec in manifest.components.items()}
    assert windows["text_encoder"] is None and windows["unet"] is None
    k = windows["vae_decoder"]
    assert k == windows["vae_encoder"] and 2 <= k <= attention_windows.QUERY_WINDOWS
    graph = onnx.load(str(export / "vae_decoder" / "model.onnx"), load_external_data=False).graph
    assert sum(node.op_type == "Softmax" for node in graph.node) == k

    latent = np.random.default_rng(0).standard_normal((1, 4, 20, 13)).astype(np.float32)  # 260 tokens
    path = export / "vae_decoder" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: latent}
    sizes = _softmax_outputs(path, feed, tmp_path)
    tokens = 20 * 13
    assert len(sizes) == k and max(sizes) == math.ceil(tokens / k) * tokens  # a window's rows, never N x N

    got = session.run(None, feed)[0]
    with torch.no_grad():
        expected = tiny_sd.pipeline.vae.decode(torch.from_numpy(latent)).sample.numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_the_memory_guard_counts_windowed_scores():
    base = Footprint({"text_encoder": 1, "unet": 1, "vae_decoder": 1}, {}, 4, 8,
                     unet_block_channels=(320, 640, 1280, 1280), vae_block_channels=(128, 256, 512, 512))
    windowed = Footprint(**{**base.__dict__, "attention_windows": {"vae_decoder": 16}})
    whole, split = (estimate(f, height=1024, width=1024, steps=1).stages["vae_decode"] for f in (base, windowed))
    tokens2 = float(128 * 128) ** 2
    assert whole - split == pytest.approx(4 * ATTENTION_K * tokens2 * (1 - 1 / 16), rel=1e-6)
