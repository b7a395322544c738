"""No tensor above the limit up to the declared maximum size (export, manifest, runtime, engines).

The export's own analysis (shape-only runs) is checked against ONNX Runtime: the model runs with
profiling on and every node's output shape in the profile is held to the limit. The test model
is tiny-sd with 8 heads per block, so that the cross-attention scores (8 x 77 per token) are
the widest tensors and both the feed-forwards and the cross-attentions get chunked. Expected
chunk counts, sizes and element counts are derived by hand from the config below.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from linfusion.export import chunking, onnx_file
from linfusion.export.cli import main as export_main
from linfusion.export.exporter import export_pipeline
from linfusion.runtime.contract import PipelineFacts
from linfusion.runtime.limits import cfg_mode_for, check_size, max_unet_batch
from linfusion.runtime.manifest import load_manifest
from linfusion.runtime.request import GenerationError

from linfusion.presets import Preset, build_random_pipeline, get_preset

MAX_SIZE = (256, 128)  # latents 32 x 16: 512 tokens at level 0, 128 at level 1, 32 at level 2
LIMIT = 100_000
HEADS = 8
CONTEXT = 77
# Level 0 (32 channels): cross-attention scores 8 * 77 = 616 per token -> 315,392 > LIMIT: windows of at most
# floor(LIMIT / 616) = 162 tokens -> ceil(512 / 162) = 4; feed-forward GEGLU 2 * 4 * 32 = 256 per token ->
# 131,072 -> ceil(512 / floor(LIMIT / 256)) = 2. Level 1 (64 channels, 128 tokens): 78,848 and 65,536 fit.
# Up-block concatenation at level 0: 64 upsampled + 32 skip = 96 channels x 512 tokens = 49,152 (no chunking).
CHUNKS_LEVEL0 = {"attn2": 4, "ff": 2}
CONCAT_LEVEL0 = 96 * 512


@dataclass(frozen=True)
class _FolderPreset(Preset):
    root: str = ""

    def config_path(self, *parts: str) -> Path:
        return Path(self.root).joinpath(*parts)


@pytest.fixture(scope="module")
def heads8(tmp_path_factory):
    from linfusion.checkpoint import LinFusion
    from linfusion.loader import LoadedPipeline

    root = tmp_path_factory.mktemp("tiny-sd-8-heads") / "configs"
    shutil.copytree(get_preset("tiny-sd").config_path(), root)
    config = json.loads((root / "unet" / "config.json").read_text())
    config["attention_head_dim"] = [HEADS] * 3  # diffusers' SD-1 name for the head count
    (root / "unet" / "config.json").write_text(json.dumps(config))
    preset = _FolderPreset("tiny-sd-8-heads", "tests", None, None, None, root=str(root))
    pipe = build_random_pipeline(preset, seed=3)
    linfusion = LinFusion.from_unet(pipe.unet)
    linfusion.mount(pipe.unet)
    return LoadedPipeline(pipe, linfusion, preset.name, None, None, None, None, True, preset, seed=3)


@pytest.fixture(scope="module")
def exports(heads8, tmp_path_factory):
    """(chunked, unchunked) UNet-only exports of the same model at MAX_SIZE."""
    folder = tmp_path_factory.mktemp("limit-exports")
    chunked = export_pipeline(heads8, folder / "chunked", components=["unet"], progress=lambda line: None,
                              max_size=MAX_SIZE, tensor_limit=LIMIT)
    assert chunked.pipeline.tensor_limit == LIMIT
    export_pipeline(heads8, folder / "plain", components=["unet"], progress=lambda line: None, max_size=MAX_SIZE)
    return folder / "chunked", folder / "plain"


def _feed(batch, height, width, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
            "timestep": np.full(batch, 321.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, CONTEXT, 32), dtype=np.float32)}


def _run(export, feed, profile_dir=None):
    """(output, {node: [output element counts]}) with every graph optimisation off, so the profile
    lists the exported graph's nodes (the LinearAttention functions inlined) one for one."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "ort")
    session = ort.InferenceSession(str(export / "unet" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    out = session.run(None, feed)[0]
    if profile_dir is None:
        return out, {}
    events = json.loads(Path(session.end_profiling()).read_text())
    sizes = {e["name"][: -len("_kernel_time")]: [math.prod(next(iter(s.values()))) for s in e["args"]["output_type_shape"]]
             for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    return out, sizes


def _largest(sizes):
    return max(((n, s) for n, counts in sizes.items() for s in counts), key=lambda item: item[1])


def test_every_node_stays_under_the_limit_at_the_max_size(exports, tmp_path):
    chunked, plain = exports
    manifest = load_manifest(chunked)
    _, sizes = _run(chunked, _feed(1, MAX_SIZE[1] // 8, MAX_SIZE[0] // 8), tmp_path)
    assert len(sizes) > 500, "the profile should list every node"
    name, largest = _largest(sizes)
    assert largest <= LIMIT, f"{name} has {largest} elements"
    # the export's own figure is the largest tensor ONNX Runtime made: the chunked scores [1, 8, 128, 77]
    assert manifest.components["unet"].largest_tensor.elements == largest == HEADS * 128 * CONTEXT
    # the unchunked graph of the same model does exceed it (the check can fail): scores [1, 8, 512, 77]
    _, plain_sizes = _run(plain, _feed(1, MAX_SIZE[1] // 8, MAX_SIZE[0] // 8), tmp_path)
    assert _largest(plain_sizes)[1] == HEADS * 512 * CONTEXT > LIMIT


def test_graph_is_chunked_as_derived_and_keeps_height_and_width_symbolic(exports):
    chunked, plain = exports
    model = onnx.load(str(chunked / "unet" / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "height", "width"]
    # one Softmax per cross-attention window: 3 level-0 blocks x 4 windows + 4 unchunked blocks
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)
    assert count(model, "Softmax") == 3 * CHUNKS_LEVEL0["attn2"] + 4
    assert count(onnx.load(str(plain / "unet" / "model.onnx")), "Softmax") == 7
    assert count(model, "Erf") + count(model, "Gelu") == 3 * CHUNKS_LEVEL0["ff"] + 4


@pytest.mark.parametrize("batch,latent", [(1, (16, 32)), (2, (16, 32)), (1, (4, 4)), (2, (12, 20)), (1, (24, 8))])
def test_chunked_matches_unchunked(exports, batch, latent):
    chunked, plain = exports
    feed = _feed(batch, *latent, seed=batch)
    got, want = _run(chunked, feed)[0], _run(plain, feed)[0]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-6


def test_batch2_size_is_the_largest_under_the_limit(exports, tmp_path):
    """At the recorded batch-2 size every node stays under; one aspect-preserving step larger, one does not."""
    chunked, _ = exports
    facts = load_manifest(chunked).pipeline
    width, height = facts.max_batch2_size
    assert width * MAX_SIZE[1] == height * MAX_SIZE[0] and width % 32 == 0 and height % 32 == 0
    _, sizes = _run(chunked, _feed(2, height // 8, width // 8), tmp_path)
    assert _largest(sizes)[1] <= LIMIT
    step = math.gcd(*MAX_SIZE) // 32
    bigger = (width + MAX_SIZE[0] // step, height + MAX_SIZE[1] // step)
    assert bigger[0] <= MAX_SIZE[0], "batch 2 should not fit at the max size with this limit"
    _, sizes = _run(chunked, _feed(2, bigger[1] // 8, bigger[0] // 8), tmp_path)
    assert _largest(sizes)[1] > LIMIT


def test_manifest_records_the_limits(exports):
    facts = load_manifest(exports[0]).pipeline
    assert (facts.max_size, facts.tensor_limit) == (MAX_SIZE, LIMIT)
    plain = load_manifest(exports[1])
    assert plain.pipeline.tensor_limit == 2**31 - 1 and plain.pipeline.max_batch2_size == MAX_SIZE
    # older manifests have none of it
    old = {k: v for k, v in facts.to_dict().items() if k not in ("max_size", "tensor_limit", "max_batch2_size")}
    assert PipelineFacts.from_dict(old).max_size is None


def test_a_convolution_over_the_limit_refuses_before_tracing(monkeypatch, capsys, tmp_path):
    def trace(*args, **kwargs):
        raise AssertionError("traced although the limit cannot be met")

    monkeypatch.setattr(onnx_file, "trace", trace)
    code = export_main(["--model", "tiny-sd", "--output", str(tmp_path / "out"), "--components", "unet",
                        "--max-size", "256x128", "--tensor-limit", "40000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not (tmp_path / "out").exists()
    # tiny-sd: 64 upsampled + 32 skip channels at latent 16 x 32
    assert "up_blocks.2/cat [1, 96, 16, 32]" in err and f"{96 * 16 * 32:,} elements" in err and "256x128" in err


def test_bad_max_size_fails_before_loading(capsys, tmp_path):
    assert export_main(["--model", "tiny-sd", "--output", str(tmp_path / "o"), "--max-size", "16384"]) == 2
    assert "WxH" in capsys.readouterr().err


# --- runtime and engines ---------------------------------------------------------------------

def _facts(max_size=(16384, 8192), batch2=(11904, 5952)):
    return PipelineFacts("sd", "StableDiffusionPipeline", 4, 8, 8, 0.18215, None, False, 512, 77, ("text_encoder",),
                         max_size=max_size, tensor_limit=2**31 - 1, max_batch2_size=batch2)


def test_runtime_refuses_sizes_beyond_the_max_size():
    facts = _facts()
    check_size(facts, 16384, 8192)
    check_size(facts, 8192, 16384)  # the same pixels in portrait
    check_size(facts, 11584, 11584)
    for width, height in [(16384, 8256), (32768, 4096), (11648, 11648)]:
        with pytest.raises(GenerationError, match=f"{width}x{height} is beyond .* 16384x8192") as info:
            check_size(facts, width, height)
        assert "\n" not in str(info.value)
    check_size(_facts(None, None), 65536, 65536)  # an export without limits


def test_guidance_turns_sequential_above_the_batch2_size():
    facts = _facts()
    assert cfg_mode_for(facts, 11904, 5952, 1, "batched") == "batched"
    assert cfg_mode_for(facts, 11968, 5984, 1, "batched") == "sequential"
    assert cfg_mode_for(facts, 16384, 8192, 1, "batched") == "sequential"
    assert cfg_mode_for(facts, 1024, 1024, 1, "sequential") == "sequential"
    assert cfg_mode_for(facts, 4096, 4096, 4, "batched") == "batched"  # 8 x 16.8M <= 2 x 70.9M pixels
    assert max_unet_batch(facts, 16384, 8192) == 1 and max_unet_batch(facts, 32768, 8192) == 0
    with pytest.raises(GenerationError, match="at most 1 at a time"):
        cfg_mode_for(facts, 16384, 8192, 2, "batched")
    assert cfg_mode_for(_facts(None, None), 16384, 8192, 4, "batched") == "batched"


def test_build_refuses_profiles_beyond_the_max_size(exports, capsys):
    from linfusion.engines import profiles as P
    from linfusion.engines.cli import main as build_main

    chunked, _ = exports
    for args in (["--sizes", "288x128"], ["--min-size", "128", "--opt-size", "256", "--max-size", "256"],
                 ["--sizes", "64x512"]):
        assert build_main([str(chunked), *args]) == 2  # bad input: exit status 2, one line
        err = capsys.readouterr().err
        assert "beyond this export's maximum size 256x128" in err and err.count("\n") == 1
    assert build_main([str(chunked), "--sizes", "256x128", "--batch", "1:1:2"]) == 2
    assert "at most 1 fit" in capsys.readouterr().err
    manifest = load_manifest(chunked)
    # the default range shrinks to the largest square within 256x128 (181 -> 160 px)
    assert P.largest_square_side(manifest) == 160
    batch2 = manifest.pipeline.max_batch2_size
    spatial = P.spatial_profiles(32, sizes=[MAX_SIZE, batch2])
    P.check_limits(manifest, spatial, P.Range(1, 1, 1))
    big, small = (P.component_profiles(manifest, "unet", [sp], P.Range(1, 1, 1))[0] for sp in spatial)
    assert big.shapes["sample"][2][0] == 1 and small.shapes["sample"][2][0] == 2  # guidance sequential above


# --- the chunking itself ---------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.block = BasicTransformerBlock(32, 8, 4, cross_attention_dim=16)

    def forward(self, x, context):
        return self.block(x, encoder_hidden_states=context)


def test_windows_are_never_empty_in_pytorch_and_onnx(tmp_path):
    """Five windows over fewer than five tokens: each window keeps at least one token (an empty
    query breaks the attention's reshape), and the graph exported over a symbolic token count
    (traced with every window two tokens wide or more, as the exporter does) matches the
    unchunked module at any count."""
    torch.manual_seed(0)
    root = _Block().eval()
    chunks = dict.fromkeys(chunking.chunkable(root), 5)
    assert set(chunks) == {"ff", "attn2"}
    context = torch.randn(2, CONTEXT, 16)
    with torch.no_grad():
        for tokens in (1, 2, 3, 7, 50):
            x = torch.randn(2, tokens, 32)
            want = root(x, context)
            with chunking.applied(root, chunks) as patched:
                got = root(x, context)
            assert patched == 2 and torch.allclose(got, want, rtol=1e-5, atol=1e-6), tokens
        dim = torch.export.Dim("tokens", min=1, max=4096)
        with chunking.applied(root, chunks):
            program = torch.onnx.export(root, (torch.randn(2, 20, 32), context), dynamo=True, input_names=["x", "c"],
                                        dynamic_shapes=({1: dim}, None), optimize=True, verbose=False)
    program.save(str(tmp_path / "block.onnx"))
    session = ort.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])
    softmax = sum(n.op_type == "Softmax" for n in onnx.load(str(tmp_path / "block.onnx")).graph.node)
    assert softmax == 1 + 5  # this block's attn1 is diffusers' softmax attention, attn2 has five windows
    for tokens in (2, 5, 64):
        x = torch.randn(2, tokens, 32)
        with torch.no_grad():
            want = root(x, context).numpy()
        got = session.run(None, {"x": x.numpy(), "c": context.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_real_size_models_at_16384x8192(name):
    """The default export of SD-1.5 and SD-XL (meta weights: nothing allocated), against figures
    derived from their configs: GEGLU widths 8 x channels, the level-0 skip concatenation of
    block_out_channels[1] + [0] channels, and batch 2 bound by that concatenation."""
    from linfusion.export.components import unet_component

    from linfusion.checkpoint import LinFusion

    preset = get_preset(name)
    pipe = build_random_pipeline(preset, device="meta")
    with torch.device("meta"):
        LinFusion.from_unet(pipe.unet, preset.projection_mid_divisor).mount(pipe.unet)
    config, limit = pipe.unet.config, 2**31 - 1
    latent_multiple = 2 ** pipe.unet.num_upsamplers
    component = unet_component(pipe, preset.is_xl, latent_multiple, torch.float32)
    plan = chunking.plan_unet(component, (16384, 8192), limit, 8, 8 * latent_multiple)
    tokens0 = (16384 // 8) * (8192 // 8)
    levels = len(config.block_out_channels)
    heads = config.attention_head_dim  # diffusers' SD name for the head count, per level or one for all
    expected = {}
    for module in plan.chunks:
        kind, index = module.split(".")[:2]
        level = int(index) if kind == "down_blocks" else levels - 1 - int(index) if kind == "up_blocks" else levels - 1
        tokens = tokens0 // 4**level
        width = (8 * config.block_out_channels[level] if module.endswith("ff") else
                 (heads[level] if isinstance(heads, (list, tuple)) else heads) * CONTEXT)
        expected[module] = math.ceil(tokens / (limit // width)) if width * tokens > limit else 1
    assert plan.chunks == expected and max(expected.values()) == (3 if name == "sd15" else 2)
    concat = config.block_out_channels[0] + config.block_out_channels[1]
    assert plan.largest.elements == concat * tokens0 <= limit and plan.largest.op == "cat"
    height = math.isqrt(limit * 64 // (2 * concat * 2)) // (8 * latent_multiple) * (8 * latent_multiple)
    assert plan.max_batch2_size == (2 * height, height)


# --- the plugin kernels' index arithmetic at the chain's largest N -----------------------------

PROBE = r"""
#include <sys/mman.h>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
typedef void (*StateFn)(const void*, const void*, int, int, float*);
typedef void (*ApplyFn)(const void*, const float*, int, int, int, void*);
static void* reserve(unsigned long long bytes) {  // untouched pages read as zeros and take no memory
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { std::perror("mmap"); std::exit(3); }
    return p;
}
static int dt;  // 0 float32, 1 float16, 2 bfloat16
static void store(void* base, long long i, float x) {
    if (dt == 0) LinfusionF32::store((float*)base + i, x);
    else if (dt == 1) LinfusionF16::store((linfusion_half*)base + i, x);
    else LinfusionBF16::store((linfusion_bfloat16*)base + i, x);
}
static float load(const void* base, long long i) {
    return dt == 0 ? LinfusionF32::load((const float*)base + i) : dt == 1 ? LinfusionF16::load((const linfusion_half*)base + i)
                                                                        : LinfusionBF16::load((const linfusion_bfloat16*)base + i);
}
// One block of a grid, with the emulator's threads and barriers (see test_engines_kernels.SHIM).
static void run_block(unsigned gx, unsigned gy, unsigned bx, unsigned x, unsigned y, const std::function<void()>& body) {
    gridDim = {gx, gy, 1}; blockDim = {bx, 1, 1}; blockIdx = {x, y, 0};
    std::barrier<> bar((std::ptrdiff_t)bx);
    linfusion_emu_barrier = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    linfusion_emu_warp_barriers.clear();
    for (unsigned w = 0; w < (bx + 31) / 32; ++w) {
        warp_bars.emplace_back(new std::barrier<>((std::ptrdiff_t)std::min(32u, bx - 32 * w)));
        linfusion_emu_warp_barriers.push_back(warp_bars.back().get());
    }
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < bx; ++t) threads.emplace_back([&, t] { threadIdx = {t, 0, 0}; body(); });
    for (auto& th : threads) th.join();
}
int main(int, char** argv) {
    std::ifstream in(argv[1]);
    std::string w, name;
    int n = 0, heads = 0, eps = 0; long long elements = 0, floats_n = 0; unsigned gx = 0, gy = 0, bx = 0;
    void *a = nullptr, *b = nullptr, *out = nullptr; float* floats = nullptr;
    while (in >> w) {
        if (w == "setup") {
            in >> name >> dt >> n >> heads >> eps >> elements >> floats_n >> gx >> gy >> bx;
            const int size = dt == 0 ? 4 : 2;
            a = reserve(elements * size); b = reserve(elements * size); out = reserve(elements * size);
            floats = (float*)reserve(floats_n * 4);
        } else if (w == "poison") { for (long long i = 0; i < floats_n; ++i) floats[i] = std::nanf("");
        } else if (w == "poison_range") { long long lo, hi; in >> lo >> hi; for (long long i = lo; i < hi; ++i) floats[i] = std::nanf("");
        } else if (w == "pattern") { for (long long i = 0; i < floats_n; ++i) floats[i] = 1e-3f * (1 + i % 1009);
        } else if (w == "poke") { int which; long long i; float x; in >> which >> i >> x; store(which ? b : a, i, x);
        } else if (w == "state") { unsigned x, y; in >> x >> y; StateFn f = STATES.at(name);
            run_block(gx, gy, bx, x, y, [&] { f(a, b, n, heads, floats); });
        } else if (w == "apply") { unsigned x, y; in >> x >> y; ApplyFn f = APPLIES.at(name);
            run_block(gx, gy, bx, x, y, [&] { f(a, floats, n, heads, eps, out); });
        } else if (w == "dump") { std::string path; in >> path; FILE* f = std::fopen(path.c_str(), "wb");
            std::fwrite(floats, 4, floats_n, f); std::fclose(f);
        } else if (w == "dump_range") { std::string path; long long lo, hi; in >> path >> lo >> hi;
            FILE* f = std::fopen(path.c_str(), "wb"); std::fwrite(floats + lo, 4, hi - lo, f); std::fclose(f);
        } else if (w == "range") {  // the kernels' own token split: linfusion_split_range(split, splits, n)
            int split, splits, tokens; in >> split >> splits >> tokens;
            const LinfusionRange r = linfusion_split_range(split, splits, tokens);
            std::printf("%d %d\n", r.begin, r.end);
        } else if (w == "read") { long long i; in >> i; std::printf("%.9g\n", load(out, i));
        } else if (w == "nonzero") {  // elements [lo, hi) of out the blocks wrote (the outputs are positive)
            long long lo, hi, count = 0; in >> lo >> hi;
            for (long long i = lo; i < hi; ++i) count += dt == 0 ? ((const unsigned*)out)[i] != 0 : ((const unsigned short*)out)[i] != 0;
            std::printf("%lld\n", count);
        }
    }
}
"""
KERNEL_CASES = {  # (heads, head dim, tokens, batch) of the largest-N LinFusion layer at 16384x8192 / the batch-2 size
    "sd15": (8, 40, 2048 * 1024, 1), "sd15-batch2": (8, 40, (11904 // 8) * (5952 // 8), 2),
    "sdxl": (10, 64, 1024 * 512, 1), "sdxl-batch2": (10, 64, (11904 // 16) * (5952 // 16), 2)}
KERNEL_RUNS = [("sd15", "float32", 1), ("sd15", "float16", 2), ("sd15-batch2", "bfloat16", 1),
               ("sdxl", "float16", 1), ("sdxl", "bfloat16", 2), ("sdxl-batch2", "float16", 3)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The kernels compiled for the host with signed-overflow checks that abort the probe."""
    from linfusion.engines import kernel_build as K
    from test_engines_kernels import SHIM

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not on PATH")
    variants = sorted({(dtype, KERNEL_CASES[case][1]) for case, dtype, _ in KERNEL_RUNS})
    states, applies, wrappers = [], [], []
    for dtype, d in variants:
        io = K.IO_TRAITS[dtype]
        for tactic in K.tactics(dtype, "sm_90", d):
            st, ap = K.state_kernel(dtype, d, tactic), K.apply_kernel(dtype, d, tactic)
            wrappers += [(f"static void w_{st}(const void* k, const void* v, int n, int h, float* p) {{ {st}((const {io}::T*)k,"
                         f" (const {io}::T*)v, n, h, p); }}"),
                         (f"static void w_{ap}(const void* q, const float* s, int n, int h, int e, void* o) {{ {ap}("
                         f"(const {io}::T*)q, s, n, h, e, ({io}::T*)o); }}")]
            states.append(f'{{"{st}", w_{st}}}')
            applies.append(f'{{"{ap}", w_{ap}}}')
    tables = (f"static const std::map<std::string, StateFn> STATES = {{{', '.join(dict.fromkeys(states))}}};\n"
              f"static const std::map<std::string, ApplyFn> APPLIES = {{{', '.join(applies)}}};\n")
    folder = tmp_path_factory.mktemp("kernel-probe")
    source = SHIM + K.kernel_source(variants) + "\n".join(dict.fromkeys(wrappers)) + "\n"
    source += PROBE.replace("int main(", tables + "int main(")
    (folder / "probe.cpp").write_text(source)
    flags = ["-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-fsanitize=signed-integer-overflow",
             "-fno-sanitize-recover=all"]
    import subprocess
    proc = subprocess.run([cxx, *flags, "-o", str(folder / "probe"), str(folder / "probe.cpp")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def run(lines):
        (folder / "cmd.txt").write_text("\n".join(lines) + "\n")
        done = subprocess.run([str(folder / "probe"), str(folder / "cmd.txt")], capture_output=True, text=True, check=False)
        if done.returncode == 3 and "mmap" in done.stderr:
            pytest.skip("cannot reserve the buffers' address space here (vm.overcommit_memory=2?)")
        assert done.returncode == 0 and "runtime error" not in done.stderr, done.stderr[-2000:]
        return [float(v) for v in done.stdout.split()]

    return run, folder


INT32_MAX = 2**31 - 1
LIMIT_RUNS = [("float32", 40, 1), ("float16", 40, 2), ("bfloat16", 64, 2), ("float16", 64, 3)]
"""(dtype, head dim, tactic) of the kernels run at N = 2^31 - 1 (variants the probe compiles)."""


def far_end_blocks(probe, dtype, d, tactic, heads, n, batch, splits=None):
    """Run the blocks at the far end of every buffer (last split, last tile, last batch x head) and
    check what they wrote against values derived by hand. q, k, v and out are reserved, not
    allocated (only touched pages take memory); a few tokens are set at offsets computed here in
    Python integers; any signed 32-bit overflow on the way aborts the probe. ``splits``: the
    state grid's split count (default: the plugins' ``num_splits``); only the slots next to the
    last split's are poisoned and read, and only the outputs next to the checked tiles counted."""
    from linfusion.engines import kernel_build as K
    from test_engines_kernels import TOLERANCE

    run, folder = probe
    tactic = K.kernel_tactic(tactic, dtype, "sm_90", d)
    t, cuda_core = K.tiling(d), tactic == K.CUDA_CORE
    s = splits or K.num_splits(n, batch, heads, t)
    slot = d * (d + 1)
    elements, partials, states = batch * n * heads * d, batch * heads * s * slot, batch * heads * slot
    state_launch, apply_launch = K.state_launch(s, batch, heads, t, tactic=tactic), K.apply_launch(n, batch, heads, t,
                                                                                                   tactic=tactic)
    assert max(n, s, t.state_elements) <= INT32_MAX
    for g in (state_launch, apply_launch, K.reduce_launch(batch, heads, t.state_elements)):
        assert g.grid[0] <= INT32_MAX and g.grid[1] <= 65535 and g.block[0] <= 1024
    code = K.DTYPES.index(dtype)
    bh = batch * heads - 1

    def offset(row, token, col):
        b, h = divmod(row, heads)
        return ((b * n + token) * heads + h) * d + col

    # state: v = 1 in column 0 at the first and last token of the last non-empty split and at its
    # neighbours outside; phi(k) = 2 at (last token, row 1), elsewhere phi(0) = 1
    per = -(-n // s)
    last = (n - 1) // per
    begin, end = last * per, min(n, last * per + per)
    assert end - begin > 1
    # all partials, or where that is too many, the slots of the last split, its neighbour before and the last
    first_slot = 0 if partials <= 2**26 else bh * s + max(last - 1, 0)
    window = (first_slot * slot, partials if first_slot == 0 else (bh * s + s) * slot)
    tiles = t.state_col_tiles if cuda_core else 1
    g = state_launch
    lines = [(f"setup {K.state_kernel(dtype, d, tactic)} {code} {n} {heads} 0 {elements} {partials} {g.grid[0]} "
             f"{g.grid[1]} {g.block[0]}"), "poison_range {} {}".format(*window), f"poke 0 {offset(bh, end - 1, 1)} 1"]
    lines += [f"poke 1 {offset(bh, token, 0)} 1" for token in (begin - 1, begin, end - 1, end) if token < n]
    lines += [f"state {split * tiles + j} {bh}" for split in sorted({last, s - 1}) for j in range(tiles)]
    run([*lines, "dump_range {} {} {}".format(folder / "partials.bin", *window)])
    got = np.fromfile(folder / "partials.bin", np.float32).reshape(-1, d, d + 1)
    want = np.full(got.shape, np.nan, np.float32)
    want[bh * s + s - 1 - first_slot] = 0.0  # an empty last split writes zeros (when it is the last non-empty one, overwritten next)
    mine = want[bh * s + last - first_slot]
    mine[...] = 0.0
    mine[:, d], mine[1, d] = (end - begin) / n, (end - begin + 1) / n
    mine[:, 0], mine[1, 0] = 2 / n, 3 / n
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)

    # apply: the last tile of the last row and the first tile of row 0, state = a fixed pattern,
    # phi(q) = 2 at (last token, column 0) of the last row, elsewhere 1
    if cuda_core:
        rows, tiles = t.apply_tokens, t.apply_col_tiles
    else:
        tc = K.tensor_core_tiling(d, wide=tactic == K.TENSOR_CORE_WIDE)
        rows, tiles = tc.apply_rows, tc.apply_col_tiles
    groups = -(-n // rows)
    g = apply_launch
    lines = [(f"setup {K.apply_kernel(dtype, d, tactic)} {code} {n} {heads} {K.eps_bits(1e-4)} {elements} {states} "
             f"{g.grid[0]} {g.grid[1]} {g.block[0]}"), "pattern", f"poke 0 {offset(bh, n - 1, 0)} 1"]
    lines += [f"apply {(groups - 1) * tiles + j} {bh}" for j in range(tiles)] + [f"apply {j} 0" for j in range(tiles)]
    checks = [(bh, token) for token in ((groups - 1) * rows, n - 1)] + [(0, 0), (0, min(rows, n) - 1)]
    near = [(0, min(elements, offset(0, 2 * rows, 0))), (max(0, offset(bh, (groups - 2) * rows, 0)), elements)]
    counted = [(0, elements)] if elements <= 2**28 or near[0][1] >= near[1][0] else near
    values = run([*lines, *(f"nonzero {lo} {hi}" for lo, hi in counted),
                  *(f"read {offset(r, token, col)}" for r, token in checks for col in range(d))])
    written = sum(values[:len(counted)])
    assert written == (n - (groups - 1) * rows + min(rows, n)) * d, "blocks wrote outside their tiles"
    state = (np.float32(1e-3) * (1 + np.arange(states) % 1009).astype(np.float32)).reshape(batch * heads, d, d + 1)
    for (r, token), got_row in zip(checks, np.reshape(values[len(counted):], (len(checks), d))):
        phi = np.ones(d)
        phi[0] = 2.0 if (r, token) == (bh, n - 1) else 1.0
        kv, mean = state[r, :, :d].astype(np.float64), state[r, :, d].astype(np.float64)
        want_row = phi @ kv / (phi @ mean + 1e-4)
        assert np.abs(got_row - want_row).max() <= TOLERANCE[dtype] * np.abs(want_row).max(), (r, token)


@pytest.mark.parametrize("case,dtype,tactic", KERNEL_RUNS)
def test_kernel_index_arithmetic_at_the_largest_n(probe, case, dtype, tactic):
    """The far-end blocks at the largest N of the 16384x8192 chain (SD-1.5 and SD-XL, batch 1 and
    at the batch-2 size) with the real launch geometry. At these sizes every buffer also stays
    under 2^31 elements (TensorRT's limit per tensor)."""
    heads, d, n, batch = KERNEL_CASES[case]
    assert batch * n * heads * d <= INT32_MAX
    far_end_blocks(probe, dtype, d, tactic, heads, n, batch)


@pytest.mark.parametrize("dtype,d,tactic", LIMIT_RUNS)
def test_kernel_index_arithmetic_at_n_int32_max(probe, dtype, d, tactic):
    """N = 2^31 - 1, the largest the kernels' int32 argument takes: token positions near the end
    (chunk starts, n0 + offsets, the apply tile's end) must not wrap. The state grid has one split
    per 1024 tokens (any split count is valid: S is the grid's), so that the emulated last split
    runs 1023 tokens ending at token 2^31 - 2 instead of the two million the plugins' S = 1024
    would give it; the apply grid is the plugins'."""
    far_end_blocks(probe, dtype, d, tactic, heads=1, n=INT32_MAX, batch=1, splits=-(-INT32_MAX // 1024))


@pytest.mark.parametrize("tokens,splits", [(2048 * 1024, 1024), ((11904 // 8) * (5952 // 8), 1024),
                                           ((2**31 - 1) // 320, 1024), (2**31 - 1 - 1024, 1024),
                                           (2**31 - 1, 1024), (2**31 - 1, 1), (2**31 - 1, 3), (2**31 - 1, 2**21),
                                           (2**31 - 2, 65537), (1000, 1024), (77, 10)])
def test_kernel_token_splits_cover_every_token_once(probe, tokens, splits):
    """The kernels' split of N tokens over S splits, up to N = 2^31 - 1: S consecutive ranges of
    ceil(N / S) tokens (the last shorter, trailing ones empty at N) that cover [0, N) once."""
    run, _ = probe
    shown = sorted({*range(min(splits, 1024)), *range(max(0, splits - 1024), splits)})
    got = np.reshape(run([f"range {s} {splits} {tokens}" for s in shown]), (len(shown), 2)).astype(np.int64)
    per = -(-tokens // splits)
    want = np.array([(min(tokens, s * per), min(tokens, s * per + per)) for s in shown])
    assert np.array_equal(got, want)
    if len(shown) == splits:
        assert got[0, 0] == 0 and got[-1, 1] == tokens and np.array_equal(got[1:, 0], got[:-1, 1])
