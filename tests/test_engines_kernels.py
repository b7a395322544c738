"""The linear-attention CUDA kernels, checked without a GPU.

* nvcc compiles the generated translation unit (every dtype x head dim) to PTX for sm_80,
  sm_86, sm_89 and sm_90, and to cubin with no register spills (``-Xptxas -v``);
* NVRTC (cuda-python) compiles it to PTX with the entry points the plugins name (skipped
  when cuda-python is absent);
* the same kernel source is compiled as host C++ with a small shim (one std::thread per CUDA
  thread, a std::barrier for __syncthreads and one per warp for __syncwarp, __shfl_sync and
  mma.sync, whose fragments follow the PTX ISA tables; blocks run one after another), launched
  with the grids from ``linfusion.engines.kernel_build`` for both tactics, and compared with a
  float64 numpy reference. That checks indexing, tiling, split, bounds and alignment logic and
  the dtype conversions on the CPU; the real-GPU check is benchmarks/gpu_check.py.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
from linfusion.engines import kernel_build as K
from reference import attention_core, phi

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")


def reference(q, k, v, heads, eps):
    """tests/reference.py's float64 LinFusion attention on [B, N, H*d], from inputs of any dtype."""
    return attention_core(*(np.asarray(x, dtype=np.float64) for x in (q, k, v)), heads, eps)


# --- nvcc -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_source():
    return K.kernel_source(K.all_variants())


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_to_ptx_and_cubin_without_spills(all_source, arch):
    ptx, _ = K.nvcc_compile(all_source, arch, "ptx")
    entries = set(K.ptx_entries(ptx))
    expected = K.kernel_names(K.all_variants(), arch)
    assert any("_tc_" in name for name in expected), "tensor-core kernels are expected on sm_80+"
    assert expected <= entries, f"missing entry points: {sorted(expected - entries)}"
    _, log = K.nvcc_compile(all_source, arch, "cubin", ["-Xptxas", "-v"])
    reports = K.parse_ptxas(log)
    assert expected <= set(reports), "ptxas -v did not report every kernel"
    for name in expected:
        r = reports[name]
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{name} spills on {arch}: {r}"
        assert r.registers > 0
        assert r.smem <= 48 * 1024, f"{name} uses {r.smem} bytes of static shared memory"


def test_parse_ptxas_reads_spills():
    log = """ptxas info    : Compiling entry function 'foo' for 'sm_90'
ptxas info    : Function properties for foo
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 25600 bytes smem, 400 bytes cmem[0]
"""
    r = K.parse_ptxas(log)["foo"]
    assert (r.registers, r.spill_stores, r.spill_loads, r.smem) == (48, 12, 8, 25600)


def test_tensor_core_tiling_fits_for_every_head_dim():
    for d in range(1, K.TENSOR_CORE_MAX_HEAD_DIM + 1):
        t = K.tensor_core_tiling(d)
        assert t.apply_smem <= K.SHARED_MEMORY_LIMIT and t.state_smem <= K.SHARED_MEMORY_LIMIT, d
        assert t.padded_n % t.apply_cols == 0 and t.apply_rows % t.apply_tokens == 0, d
        assert t.state_threads <= 1024 and t.apply_threads <= 1024 and t.apply_tokens % 16 == 0, d
    assert K.tactics("float16", "sm_90", K.TENSOR_CORE_MAX_HEAD_DIM + 1) == (K.CUDA_CORE,)
    with pytest.raises(ValueError, match="tensor-core range"):
        K.tensor_core_tiling(K.TENSOR_CORE_MAX_HEAD_DIM + 1)


def test_tiling_fits_shared_memory_and_block_limits():
    for d in range(1, K.MAX_HEAD_DIM + 1):
        t = K.tiling(d)
        assert t.state_smem <= 48 * 1024 and t.apply_smem <= 48 * 1024
        assert t.state_threads <= 1024 and t.apply_threads <= 1024
        assert t.state_cols % 4 == 0 and t.apply_cols % 4 == 0 and t.apply_tokens % 4 == 0
        assert t.state_threads >= t.padded, "the phi(k) sum needs one thread per padded row"
        assert t.state_col_tiles * t.state_cols >= d and t.apply_col_tiles * t.apply_cols >= d
    with pytest.raises(ValueError):
        K.tiling(257)


def test_splits_and_grids():
    t = K.tiling(64)
    assert K.num_splits(64, 1, 8, t) == 1
    assert K.num_splits(4096, 1, 8, t) == 16  # min(4096/256, 1024/8)
    assert K.num_splits(262144 + 77, 1, 8, t) == 128  # capped by the block target
    assert K.num_splits(262144, 2, 10, t) == 52
    launch = K.apply_launch(1000, 2, 3, K.tiling(160))
    assert launch.grid == (32 * 4, 6, 1) and launch.block == (80, 1, 1)
    # tensor-core: 256 tokens per apply block, 64 tokens (4 warps) per pass, 40-column tiles for d = 160
    launch = K.apply_launch(1000, 2, 3, K.tiling(160), tactic=K.TENSOR_CORE)
    assert launch.grid == (4 * 4, 6, 1) and launch.block == (128, 1, 1)
    assert K.state_launch(7, 2, 3, K.tiling(160), tactic=K.TENSOR_CORE).grid == (7, 6, 1)
    assert K.state_launch(7, 2, 3, K.tiling(160), tactic=K.TENSOR_CORE).block == (320, 1, 1)  # 10 warps x 16 rows
    assert K.reduce_launch(2, 3, 64 * 65).grid == (-(-64 * 65 // 256), 6, 1)
    assert K.eps_bits(1e-4) == np.array([1e-4], np.float32).view(np.int32)[0]


def test_nvrtc_compiles_entry_points():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (NVRTC) is not installed")
    try:
        ptx = K.compile_ptx(K.kernel_source([("float16", 64), ("bfloat16", 40)]), "compute_80")
    except K.KernelCompileError as exc:
        if "libnvrtc" in str(exc).lower() or "not found" in str(exc).lower():
            pytest.skip(f"NVRTC library unavailable: {exc}")
        raise
    assert K.kernel_names([("float16", 64), ("bfloat16", 40)], "compute_80") <= set(K.ptx_entries(ptx))
    assert K.state_kernel("float16", 64, tactic=K.TENSOR_CORE) in K.ptx_entries(ptx)


def test_nvrtc_reports_compile_errors():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (NVRTC) is not installed")
    with pytest.raises(K.KernelCompileError, match="error"):
        K.compile_ptx("extern \"C\" __global__ void broken( { }", "compute_80")


# --- host emulation ---------------------------------------------------------------------------

SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#define LINFUSION_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
struct dim3 { unsigned x = 0, y = 0, z = 0; };
struct float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
static thread_local dim3 threadIdx;
static dim3 blockIdx, gridDim, blockDim;
static std::barrier<>* linfusion_emu_barrier = nullptr;
static inline void __syncthreads() { linfusion_emu_barrier->arrive_and_wait(); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
static inline float linfusion_host_half_to_float(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
static inline unsigned short linfusion_host_float_to_half(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }
// Warp collectives (mma.sync, __shfl_sync): every lane posts its registers, a per-warp
// barrier, every lane reads what it needs, a second barrier before the slots are reused.
struct LinfusionEmuWarp { unsigned a[32][4]; unsigned b[32][2]; float f[32]; };
static LinfusionEmuWarp linfusion_emu_warps[32];
static std::vector<std::barrier<>*> linfusion_emu_warp_barriers;
static inline void linfusion_emu_warp_sync() { linfusion_emu_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
static inline void __syncwarp() { linfusion_emu_warp_sync(); }
static inline float __shfl_sync(unsigned, float value, int src) {
    LinfusionEmuWarp& w = linfusion_emu_warps[threadIdx.x / 32];
    w.f[threadIdx.x % 32] = value;
    linfusion_emu_warp_sync();
    const float got = w.f[src % 32];
    linfusion_emu_warp_sync();
    return got;
}
static inline float linfusion_emu_element(bool bf16, unsigned word, int high) {
    const unsigned short h = high ? (unsigned short)(word >> 16) : (unsigned short)(word & 0xffffu);
    if (bf16) { const unsigned u = (unsigned)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
    _Float16 x; std::memcpy(&x, &h, 2); return (float)x;
}
// D = A B + C for mma.m16n8k16.row.col with float32 accumulators, element positions as the
// PTX ISA's fragment tables give them (groupID = lane / 4, threadID_in_group = lane % 4).
static void linfusion_host_mma_m16n8k16(bool bf16, float* c, const unsigned* a, const unsigned* b) {
    LinfusionEmuWarp& w = linfusion_emu_warps[threadIdx.x / 32];
    const int lane = threadIdx.x % 32;
    std::memcpy(w.a[lane], a, 16);
    std::memcpy(w.b[lane], b, 8);
    linfusion_emu_warp_sync();
    auto A = [&](int row, int col) {  // a_i: row groupID (+8), col 2*tig + (i & 1) (+8 for i >= 4)
        return linfusion_emu_element(bf16, w.a[(row % 8) * 4 + (col % 8) / 2][row / 8 + 2 * (col / 8)], col % 2);
    };
    auto B = [&](int row, int col) {  // b_i: row 2*tig + (i & 1) (+8 for i >= 2), col groupID
        return linfusion_emu_element(bf16, w.b[col * 4 + (row % 8) / 2][row / 8], row % 2);
    };
    float d[4];
    for (int r = 0; r < 4; ++r) {  // c_i: row groupID (+8 for i >= 2), col 2*tig + (i & 1)
        const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
        float sum = c[r];
        for (int kk = 0; kk < 16; ++kk) sum += A(row, kk) * B(kk, col);
        d[r] = sum;
    }
    linfusion_emu_warp_sync();
    std::memcpy(c, d, 16);
}
static void linfusion_emu_launch(unsigned gx, unsigned gy, unsigned bx, const std::function<void()>& body) {
    gridDim = {gx, gy, 1}; blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, 0};
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
}
"""


def _host_wrappers(variants):
    lines = ['extern "C" void host_reduce(const float* p, int s, int e, float* out, unsigned gx, unsigned gy, unsigned bx)'
             ' { linfusion_emu_launch(gx, gy, bx, [&] { linfusion_la_reduce(p, s, e, out); }); }']
    done = set()
    for dtype, d, tactic in ((dt, dim, tc) for dt, dim in variants for tc in K.tactics(dt, "sm_90", dim)):
        io = K.IO_TRAITS[dtype]
        st, ap = K.state_kernel(dtype, d, tactic), K.apply_kernel(dtype, d, tactic)
        if st not in done:
            done.add(st)
            lines.append(f'extern "C" void host_{st}(const void* k, const void* v, int n, int h, float* p, '
                         f'unsigned gx, unsigned gy, unsigned bx) {{ linfusion_emu_launch(gx, gy, bx, [&] {{ {st}('
                         f'(const {io}::T*)k, (const {io}::T*)v, n, h, p); }}); }}')
        lines.append(f'extern "C" void host_{ap}(const void* q, const float* s, int n, int h, int eps, void* o, '
                     f'unsigned gx, unsigned gy, unsigned bx) {{ linfusion_emu_launch(gx, gy, bx, [&] {{ {ap}('
                     f'(const {io}::T*)q, s, n, h, eps, ({io}::T*)o); }}); }}')
    return "\n".join(lines) + "\n"


HOST_VARIANTS = [(dt, d) for dt in K.DTYPES for d in K.STANDARD_HEAD_DIMS] + [("float32", 6), ("float16", 6),
                                                                              ("float16", 200), ("float16", 8),
                                                                              ("float32", 150)]


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not on PATH")
    tmp = tmp_path_factory.mktemp("host-kernels")
    src = tmp / "host.cpp"
    src.write_text(SHIM + K.kernel_source(HOST_VARIANTS) + _host_wrappers(HOST_VARIANTS))
    lib = tmp / "libhost.so"
    proc = subprocess.run([cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


NP_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _misaligned(x):
    """The same values at an address 2 bytes past a 16-byte boundary."""
    raw = np.empty(x.size * x.itemsize + 16 + 2, np.uint8)
    start = (-raw.ctypes.data) % 16 + 2
    y = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    y[...] = x
    return y


def run_host(lib, q, k, v, heads, eps, dtype, tactic=K.CUDA_CORE, misaligned=False):
    """Launch state -> reduce -> apply exactly as the plugins do; outputs poisoned first."""
    if misaligned:
        q, k, v = (_misaligned(x) for x in (q, k, v))
    else:  # the tensor-core kernels' 16-byte path needs this
        assert all(x.ctypes.data % 16 == 0 for x in (q, k, v))
    b, n, c = q.shape
    d = c // heads
    t = K.tiling(d)
    s = K.num_splits(n, b, heads, t)
    partials = np.full((b, heads, s, d, d + 1), np.nan, np.float32)
    state = np.full((b, heads, d, d + 1), np.nan, np.float32)
    out = np.full(q.shape, np.nan, NP_DTYPE[dtype])
    if misaligned:
        out = _misaligned(out)
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)
    g = K.state_launch(s, b, heads, t, tactic=tactic)
    getattr(lib, f"host_{K.state_kernel(dtype, d, tactic)}")(ptr(k), ptr(v), n, heads, ptr(partials), g.grid[0], g.grid[1], g.block[0])
    g = K.reduce_launch(b, heads, t.state_elements)
    lib.host_reduce(ptr(partials), s, t.state_elements, ptr(state), g.grid[0], g.grid[1], g.block[0])
    g = K.apply_launch(n, b, heads, t, tactic=tactic)
    getattr(lib, f"host_{K.apply_kernel(dtype, d, tactic)}")(ptr(q), ptr(state), n, heads, K.eps_bits(eps), ptr(out),
                                                     g.grid[0], g.grid[1], g.block[0])
    return out, state


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


CASES = [(dtype, d, heads, batch, tokens, tactic, False) for dtype in K.DTYPES
         for d, heads, batch, tokens in [(40, 2, 1, 300), (64, 1, 2, 517), (80, 2, 1, 97), (160, 1, 2, 65)]
         for tactic in K.tactics(dtype, "sm_90", d)]
CASES += [("float32", 6, 3, 1, 40, K.CUDA_CORE, False),  # an odd head dim
          ("float16", 6, 3, 1, 300, K.TENSOR_CORE, False),  # odd head dim: the scalar tensor-core path
          ("float16", 64, 2, 1, 300, K.TENSOR_CORE, True),  # misaligned tensors: the scalar path
          ("bfloat16", 80, 1, 1, 300, K.TENSOR_CORE, True),
          ("bfloat16", 40, 1, 1, 1, K.TENSOR_CORE, False),  # one token
          ("float16", 160, 1, 1, 17, K.TENSOR_CORE, False),
          ("float16", 200, 1, 1, 70, K.CUDA_CORE, False),  # beyond the tensor-core head dims
          ("float32", 150, 1, 1, 70, K.CUDA_CORE, False)]  # column tiles that do not divide d


@pytest.mark.parametrize("dtype,d,heads,batch,tokens,tactic,misaligned", CASES)
def test_host_emulated_kernels_match_float64(host_lib, dtype, d, heads, batch, tokens, tactic, misaligned):
    rng = np.random.default_rng(d * 1000 + tokens)
    q, k, v = (rng.standard_normal((batch, tokens, heads * d)).astype(NP_DTYPE[dtype]) for _ in range(3))
    eps = 1e-4
    out, state = run_host(host_lib, q, k, v, heads, eps, dtype, tactic, misaligned)
    ref = reference(q, k, v, heads, eps)
    got = out.astype(np.float64)
    assert np.isfinite(got).all(), "some outputs were never written (poison survived)"
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= TOLERANCE[dtype], f"max rel error {err:.2e} for {dtype} d={d}"
    # the state itself: kv | mean, float32, against float64
    kf, vf = (np.asarray(x, np.float64).reshape(batch, tokens, heads, d).transpose(0, 2, 1, 3) for x in (k, v))
    pk = phi(kf)
    want = np.concatenate([pk.transpose(0, 1, 3, 2) @ vf / tokens, pk.mean(axis=2)[..., None]], axis=-1)
    # tensor-core products see phi(k) rounded to the I/O type; sums stay float32
    state_tolerance = 1e-5 if tactic == K.CUDA_CORE else TOLERANCE[dtype]
    assert np.abs(state - want).max() <= state_tolerance * np.abs(want).max()


@pytest.mark.parametrize("tactic", [K.CUDA_CORE, K.TENSOR_CORE])
def test_host_emulated_state_with_an_empty_last_split(host_lib, tactic):
    """S = 342 splits of ceil(87553 / 342) = 257 tokens: the last split has none and must write zeros."""
    d, heads, tokens = 8, 3, 87553
    t = K.tiling(d)
    s = K.num_splits(tokens, 1, heads, t)
    assert (s - 1) * -(-tokens // s) >= tokens, "the case must have an empty last split"
    rng = np.random.default_rng(5)
    k, v = (rng.standard_normal((1, tokens, heads * d)).astype(np.float16) for _ in range(2))
    partials = np.full((1, heads, s, d, d + 1), np.nan, np.float32)
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)
    g = K.state_launch(s, 1, heads, t, tactic=tactic)
    getattr(host_lib, f"host_{K.state_kernel('float16', d, tactic)}")(ptr(k), ptr(v), tokens, heads, ptr(partials),
                                                                     g.grid[0], g.grid[1], g.block[0])
    assert np.isfinite(partials).all() and not partials[:, :, -1].any()
    kf, vf = (x.astype(np.float64).reshape(tokens, heads, d).transpose(1, 0, 2) for x in (k, v))
    pk = phi(kf)
    want = np.concatenate([pk.transpose(0, 2, 1) @ vf / tokens, pk.mean(axis=1)[..., None]], axis=-1)
    got = partials.sum(axis=2)[0]
    assert np.abs(got - want).max() <= TOLERANCE["float16"] * np.abs(want).max()


@pytest.mark.parametrize("tactic", [K.CUDA_CORE, K.TENSOR_CORE])
@pytest.mark.parametrize("k_shift,v_scale", [(3.0, 2e4), (-10.0, 0.1)])
def test_host_emulated_fp16_kernels_keep_extreme_states(host_lib, tactic, k_shift, v_scale):
    """kv = phi(k)^T v / N beyond fp16's 65504 (phi(k) ~ 4, v ~ 2e4), or in its subnormals
    (phi(k) ~ 5e-5), while q, k, v and the output are ordinary fp16: the tensor-core apply feeds
    kv to the MMA in fp16 and must rescale it rather than overflow or lose digits."""
    rng = np.random.default_rng(11)
    d, heads, tokens = 64, 2, 300
    shape = (1, tokens, heads * d)
    q = rng.standard_normal(shape).astype(np.float16)
    k = (k_shift + 0.5 * rng.standard_normal(shape)).astype(np.float16)
    v = (v_scale * (1 + 0.2 * rng.standard_normal(shape))).astype(np.float16)
    out, state = run_host(host_lib, q, k, v, heads, 1e-4, "float16", tactic)
    kv = np.abs(state[..., :d]).max()
    assert kv > 65504 or kv < 2.0**-14, "the case must put kv outside fp16's normal range"
    ref = reference(q, k, v, heads, 1e-4)
    got = out.astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= TOLERANCE["float16"] * np.abs(ref).max()


def test_host_emulated_kernels_are_deterministic(host_lib):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 700, 128)).astype(np.float32) for _ in range(3))
    a, _ = run_host(host_lib, q, k, v, 2, 1e-4, "float32")
    b, _ = run_host(host_lib, q, k, v, 2, 1e-4, "float32")
    assert np.array_equal(a, b)


@needs_nvcc
def test_gpu_check_dry_run_compiles_and_checks_plumbing():
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "argument lists match the plugins" in proc.stdout
