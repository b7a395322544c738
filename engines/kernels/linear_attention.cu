// LinFusion linear attention as three fixed-signature CUDA kernels: state, reduce, apply.
//
//   phi(x) = elu(x) + 1
//   kv     = phi(k)^T v / N                      [B, H, D, D]   (float32)
//   mean   = sum_N phi(k) / N                    [B, H, D]      (float32)
//   out    = phi(q) kv / (phi(q) . mean + eps)   [B, N, H*D]    (input dtype)
//
// q, k, v and out are read and written in the [B, N, H*D] layout the graph produces: no
// transposes. N is a run-time int, any value up to 2^31 - 1: a token position near N is only ever
// formed as a 64-bit offset or compared as n0 + t < end through t < end - n0, never as an int
// sum that could pass 2^31 - 1 (tests/test_tensor_limit.py runs the far-end blocks at that N).
// Nothing is recompiled per resolution.
//
// Each kernel is one TensorRT AOT plugin launch (one kernel per plugin, no workspace), so the
// reduction over N is split across launches instead of using atomics:
//
//   state  : grid (S * NJ_S, B*H). Block (s, jt) sums tokens [s*ceil(N/S), ...) of one
//            (b, h) for kv columns [jt*TJ_S, ...) and writes its own slot of the float32
//            partial tensor [B, H, S, D, D+1] (column D holds the phi(k) sum). Every slot is
//            overwritten, so no zero-initialisation is needed.
//   reduce : grid (ceil(D*(D+1)/256), B*H). Sums the S partials in a fixed order into
//            state [B, H, D, D+1] (kv | mean).
//   apply  : grid (ceil(N/TOK) * NJ_A, B*H). Each block loads one kv column tile and mean in
//            shared memory and a tile of phi(q), and writes TOK tokens x TJ_A columns.
//
// No atomics anywhere: the result is bitwise deterministic for a given S (S depends only on
// the shapes). Sums are float32 whatever the I/O type; every partial is already divided by N.
//
// Argument order follows TensorRT's AOT plugin convention: input pointers, then the extra
// 32-bit scalar arguments, then output pointers. The extern "C" entry points are generated
// per (dtype, head dim, tiling) by linfusion.engines.kernels with LINFUSION_DEFINE_KERNELS,
// which also fixes the launch geometry; these kernels check nothing at run time beyond bounds.
// tensor_core.cu and linear_attention_tc.cu, appended after this file, add the tensor-core
// tactic (LINFUSION_DEFINE_TC_KERNELS).
//
// The files include no headers (fp16/bf16 conversions are inline PTX / integer code), so
// NVRTC compiles them with no include path. LINFUSION_HOST_EMULATION is defined only by the
// CPU tests, which compile the same source as C++ with a small shim (a thread per CUDA thread,
// barriers per block and per warp) to check indexing and tiling without a GPU; it replaces the
// inline PTX (the two conversions, mma.sync) with host code and emulates the warp collectives.

typedef unsigned short linfusion_half;      // IEEE binary16 bits
typedef unsigned short linfusion_bfloat16;  // bfloat16 bits

__device__ __forceinline__ float linfusion_to_float(float x) { return x; }
__device__ __forceinline__ float linfusion_half_to_float(linfusion_half h) {
#ifdef LINFUSION_HOST_EMULATION
    return linfusion_host_half_to_float(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ float linfusion_bf16_to_float(linfusion_bfloat16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ linfusion_half linfusion_float_to_half(float f) {
#ifdef LINFUSION_HOST_EMULATION
    return linfusion_host_float_to_half(f);
#else
    linfusion_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}
__device__ __forceinline__ linfusion_bfloat16 linfusion_float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (linfusion_bfloat16)0x7fc0u;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest even
    return (linfusion_bfloat16)(u >> 16);
}

// Storage traits: one struct per I/O type.
struct LinfusionF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
};
struct LinfusionF16 {
    typedef linfusion_half T;
    static __device__ __forceinline__ float load(const linfusion_half* p) { return linfusion_half_to_float(*p); }
    static __device__ __forceinline__ void store(linfusion_half* p, float x) { *p = linfusion_float_to_half(x); }
};
struct LinfusionBF16 {
    typedef linfusion_bfloat16 T;
    static __device__ __forceinline__ float load(const linfusion_bfloat16* p) { return linfusion_bf16_to_float(*p); }
    static __device__ __forceinline__ void store(linfusion_bfloat16* p, float x) { *p = linfusion_float_to_bf16(x); }
};

__device__ __forceinline__ float linfusion_phi(float x) { return x > 0.0f ? x + 1.0f : expf(x); }

// Tokens staged in shared memory per iteration of the state kernel.
#define LINFUSION_STATE_CHUNK 32

// Head h of batch b in a [B, N, H*D] tensor starts `offset` elements in, and consecutive tokens
// are `row_stride` elements apart (64-bit: B*N*H*D may exceed 2^31).
struct LinfusionHead {
    long long row_stride;
    long long offset;
};
__device__ __forceinline__ LinfusionHead linfusion_head(int bh, int heads, int head_dim, int n_tokens) {
    const int b = bh / heads;
    const long long row_stride = (long long)heads * head_dim;
    return {row_stride, (long long)b * n_tokens * row_stride + (long long)(bh - b * heads) * head_dim};
}

// Tokens [begin, end) of one of `splits` equal splits of the N tokens (trailing splits may be
// empty: begin == end == N). Any N up to 2^31 - 1: ceil(N / S) without N + S - 1, and the bounds
// in 64 bits before they are clamped to N.
struct LinfusionRange {
    int begin;
    int end;
};
__device__ __forceinline__ LinfusionRange linfusion_split_range(int split, int splits, int n_tokens) {
    const long long per_split = n_tokens / splits + (n_tokens % splits != 0);
    const long long begin = split * per_split, end = begin + per_split;
    return {begin < n_tokens ? (int)begin : n_tokens, end < n_tokens ? (int)end : n_tokens};
}

// The start of the next chunk of `step` tokens before `end`, or `end`: n0 + step itself may pass
// 2^31 - 1 when N is close to it. Token positions are kept as n0 plus an offset below `end - n0`.
__device__ __forceinline__ int linfusion_next(int n0, int step, int end) {
    return end - n0 > step ? n0 + step : end;
}

// Global loads each thread keeps in flight while staging a tile into shared memory.
#define LINFUSION_STAGE_BATCH 8

// Tokens [n0, n0 + rows) x columns [col0, col0 + width) of one head (base: its first token);
// positions past `end` or outside the head's d columns read as 0.
template <class IO>
struct LinfusionTile {
    const typename IO::T* base;
    long long row_stride;
    int n0, end, rows, col0, width, d;
};

// Stages a tile into shared memory: BATCH loads are issued before any is used (a load followed
// at once by phi's branch would leave one load per warp in flight), then store(t, j, x, valid)
// transforms and writes token t's column j.
template <int BATCH, class IO, class Store>
__device__ __forceinline__ void linfusion_stage(const LinfusionTile<IO>& tile, int threads, const Store& store) {
    const int total = tile.rows * tile.width;
    for (int e0 = threadIdx.x; e0 < total; e0 += BATCH * threads) {
        float raw[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int e = e0 + u * threads;
            const int t = e / tile.width, j = e - t * tile.width;
            const bool valid = e < total && tile.col0 + j < tile.d && t < tile.end - tile.n0;
            raw[u] = valid ? IO::load(tile.base + ((long long)tile.n0 + t) * tile.row_stride + tile.col0 + j) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int e = e0 + u * threads;
            const int t = e / tile.width, j = e - t * tile.width;
            if (e < total) store(t, j, raw[u], tile.col0 + j < tile.d && t < tile.end - tile.n0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// state: per-split partial kv (columns [jt*TJ, jt*TJ+TJ)) and, for jt == 0, the phi(k) sum.
// Thread (ti, tj) owns a 4x4 register tile: rows 4*ti.., columns 4*tj.. of the block's tile.
// ---------------------------------------------------------------------------------------------
template <class IO, int D, int TJ>
__device__ __forceinline__ void linfusion_state(const typename IO::T* __restrict__ k,
                                                const typename IO::T* __restrict__ v, int n_tokens,
                                                int heads, float* __restrict__ partials) {
    constexpr int DP = (D + 3) / 4 * 4;
    constexpr int NJ = (D + TJ - 1) / TJ;
    constexpr int TJT = TJ / 4;
    constexpr int THREADS = (DP / 4) * TJT;
    constexpr int CH = LINFUSION_STATE_CHUNK;
    __shared__ __align__(16) float s_k[CH][DP];
    __shared__ __align__(16) float s_v[CH][TJ];

    const int tid = threadIdx.x;
    const int jt = blockIdx.x % NJ;
    const int split = blockIdx.x / NJ;
    const int splits = gridDim.x / NJ;
    const int bh = blockIdx.y;
    const LinfusionHead head = linfusion_head(bh, heads, D, n_tokens);
    const long long row_stride = head.row_stride;
    const LinfusionRange range = linfusion_split_range(split, splits, n_tokens);
    const int begin = range.begin, end = range.end;
    const typename IO::T* k_base = k + head.offset;
    const typename IO::T* v_base = v + head.offset;
    const int col0 = jt * TJ;

    const int ti = tid / TJT;
    const int tj = tid - ti * TJT;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
    float ksum = 0.0f;

    for (int n0 = begin; n0 < end; n0 = linfusion_next(n0, CH, end)) {
        // padding rows and tokens past the split contribute nothing (0, not phi(0))
        linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{k_base, row_stride, n0, end, CH, 0, DP, D}, THREADS,
                                               [&](int t, int i, float x, bool valid) {
                                                   s_k[t][i] = valid ? linfusion_phi(x) : 0.0f;
                                               });
        linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{v_base, row_stride, n0, end, CH, col0, TJ, D},
                                               THREADS, [&](int t, int j, float x, bool) { s_v[t][j] = x; });
        __syncthreads();
#pragma unroll 4
        for (int t = 0; t < CH; ++t) {
            const float4 a = *reinterpret_cast<const float4*>(&s_k[t][4 * ti]);
            const float4 c = *reinterpret_cast<const float4*>(&s_v[t][4 * tj]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[r][q] = fmaf(av[r], cv[q], acc[r][q]);
        }
        if (jt == 0 && tid < DP) {
#pragma unroll 8
            for (int t = 0; t < CH; ++t) ksum += s_k[t][tid];
        }
        __syncthreads();
    }

    const float inv_n = 1.0f / (float)n_tokens;
    float* out = partials + ((long long)bh * splits + split) * (long long)(D * (D + 1));
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = 4 * ti + r;
        if (i >= D) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int col = col0 + 4 * tj + q;
            if (4 * tj + q < TJ && col < D) out[i * (D + 1) + col] = acc[r][q] * inv_n;
        }
    }
    if (jt == 0 && tid < D) out[tid * (D + 1) + D] = ksum * inv_n;
}

// ---------------------------------------------------------------------------------------------
// reduce: state[bh, e] = sum_s partials[bh, s, e] in order s = 0, 1, ..., S-1.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
linfusion_la_reduce(const float* __restrict__ partials, int splits, int elements, float* __restrict__ state) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= elements) return;
    const long long bh = blockIdx.y;
    const float* p = partials + bh * splits * (long long)elements + e;
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += p[(long long)s * elements];
    state[bh * elements + e] = sum;
}

// ---------------------------------------------------------------------------------------------
// apply: out[b, n, h*D + col] = phi(q[b, n, h]) . kv[:, col] / (phi(q[b, n, h]) . mean + eps)
// Thread (tt, tj) owns 4 tokens x 4 columns.
// ---------------------------------------------------------------------------------------------
template <class IO, int D, int TJ, int TOK>
__device__ __forceinline__ void linfusion_apply(const typename IO::T* __restrict__ q,
                                                const float* __restrict__ state, int n_tokens, int heads,
                                                int eps_bits, typename IO::T* __restrict__ out) {
    constexpr int DP = (D + 3) / 4 * 4;
    constexpr int NJ = (D + TJ - 1) / TJ;
    constexpr int TJT = TJ / 4;
    constexpr int THREADS = (TOK / 4) * TJT;
    __shared__ __align__(16) float s_kv[DP][TJ];
    __shared__ float s_q[TOK][DP + 1];  // +1: rows 4*tt+r of one warp fall in different banks
    __shared__ float s_mean[DP];
    __shared__ float s_z[TOK];

    const int tid = threadIdx.x;
    const int jt = blockIdx.x % NJ;
    const int tile = blockIdx.x / NJ;
    const int bh = blockIdx.y;
    const LinfusionHead head = linfusion_head(bh, heads, D, n_tokens);
    const long long row_stride = head.row_stride;
    const int n0 = tile * TOK;
    const int col0 = jt * TJ;
    const float eps = __int_as_float(eps_bits);
    const float* st = state + (long long)bh * (D * (D + 1));
    const typename IO::T* q_base = q + head.offset;
    typename IO::T* o_base = out + head.offset;

    for (int e = tid; e < DP * TJ; e += THREADS) {
        const int i = e / TJ;
        const int j = e - i * TJ;
        const int col = col0 + j;
        s_kv[i][j] = (i < D && col < D) ? st[i * (D + 1) + col] : 0.0f;
    }
    for (int i = tid; i < DP; i += THREADS) s_mean[i] = i < D ? st[i * (D + 1) + D] : 0.0f;
    linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{q_base, row_stride, n0, n_tokens, TOK, 0, DP, D}, THREADS,
                                           [&](int t, int i, float x, bool valid) {
                                               s_q[t][i] = valid ? linfusion_phi(x) : 0.0f;
                                           });
    __syncthreads();
    for (int t = tid; t < TOK; t += THREADS) {
        float z = 0.0f;
#pragma unroll 4
        for (int i = 0; i < DP; ++i) z = fmaf(s_q[t][i], s_mean[i], z);
        s_z[t] = z + eps;
    }
    __syncthreads();

    const int tt = tid / TJT;
    const int tj = tid - tt * TJT;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
#pragma unroll 4
    for (int i = 0; i < DP; ++i) {
        const float4 c = *reinterpret_cast<const float4*>(&s_kv[i][4 * tj]);
        const float cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float a = s_q[4 * tt + r][i];
#pragma unroll
            for (int qq = 0; qq < 4; ++qq) acc[r][qq] = fmaf(a, cv[qq], acc[r][qq]);
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int t = 4 * tt + r;
        if (t >= n_tokens - n0) continue;
        const float inv_z = 1.0f / s_z[t];
#pragma unroll
        for (int qq = 0; qq < 4; ++qq) {
            const int col = col0 + 4 * tj + qq;
            if (4 * tj + qq < TJ && col < D)
                IO::store(o_base + ((long long)n0 + t) * row_stride + col, acc[r][qq] * inv_z);
        }
    }
}

// Entry points for one (dtype, head dim) pair. SUFFIX: f32 | f16 | bf16; TJ_S, TJ_A: kv
// columns per state / apply block (multiples of 4); TOK: tokens per apply block (multiple of 4).
// Block sizes: state (ceil4(D)/4) * (TJ_S/4) threads, apply (TOK/4) * (TJ_A/4) threads.
#define LINFUSION_DEFINE_KERNELS(SUFFIX, IO, D, TJ_S, TJ_A, TOK)                                             \
    extern "C" __global__ void __launch_bounds__(((D) + 3) / 4 * ((TJ_S) / 4), 1)                                \
    linfusion_la_state_##SUFFIX##_d##D(const IO::T* __restrict__ k, const IO::T* __restrict__ v,             \
                                       int n_tokens, int heads, float* __restrict__ partials) {               \
        linfusion_state<IO, D, TJ_S>(k, v, n_tokens, heads, partials);                                       \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(((TOK) / 4) * ((TJ_A) / 4), 1)                                  \
    linfusion_la_apply_##SUFFIX##_d##D(const IO::T* __restrict__ q, const float* __restrict__ state,          \
                                       int n_tokens, int heads, int eps_bits, IO::T* __restrict__ out) {      \
        linfusion_apply<IO, D, TJ_A, TOK>(q, state, n_tokens, heads, eps_bits, out);                         \
    }
