// Tensor-core variants of the state and apply kernels, for fp16 and bf16 I/O (sm_80+). Appended
// after linear_attention.cu and tensor_core.cu.
//
// Why: with float32 CUDA-core FMAs both kernels do 2*D^2 flops per token and head for 4*D bytes
// of fp16 traffic (D/2 flops per byte), past the H100's FMA/bandwidth ridge (about 20) for
// D >= 64. mma.sync.m16n8k16 with float32 accumulation moves the D^2 products onto the tensor
// cores.
//
// Same contract as the CUDA-core kernels: the same argument lists, the same float32 partials
// [B, H, S, D, D+1] and state, the same number of splits S; only the launch geometry differs
// (linfusion.engines.kernels). The plugins offer both as TensorRT tactics for fp16/bf16, and
// TensorRT times them at build time.
//
// Precision: phi(k), v, phi(q) and kv are rounded to the I/O type for the products (v and the
// I/O already are); every sum is float32. The phi(k) sum and the normaliser z = phi(q) . mean come
// out of the same MMAs (a column of ones, an extra kv column), so they see the same rounded phi
// values as kv and the numerator. Before the apply kernel rounds its kv tile and the mean to the
// I/O type, it scales them (and eps) by a power of two that puts the largest into [2^13, 2^14),
// so fp16 neither overflows nor falls into subnormals; the result is unchanged.
//
// Memory: the products are cheap on tensor cores, so the kernels are bound by how many loads are
// in flight. With D % 8 == 0 and 16-byte aligned tensors (checked at run time, block-uniform),
// each thread issues all its 16-byte loads before using any, the next chunk is prefetched into
// registers while the MMAs run, and the apply kernel stages its output tile through shared memory
// for 16-byte stores. Otherwise a scalar path computes the same result.

#ifdef LINFUSION_TENSOR_CORES

#define LINFUSION_TC_STATE_LD (LINFUSION_STATE_CHUNK + 8)

// ---------------------------------------------------------------------------------------------
// state: one block per (split, b*h) computes the whole D x D kv and the phi(k) sum of its tokens.
// Warp w owns kv rows [16w, 16w+16) and all columns (NT tiles of 8) plus one tile against a
// column of ones (row sums of phi(k)). Tiles: s_k = phi(k)^T [row i][token], s_v = v^T [column j]
// [token]. VEC: thread (tp, m) = (tid % 16, tid / 16) owns tokens 2tp, 2tp+1 of each chunk and
// dims [8m, 8m+8): two 16-byte loads of k and two of v.
// ---------------------------------------------------------------------------------------------
template <class IO, int D, bool VEC>
__device__ __forceinline__ void linfusion_state_tc_body(const typename IO::T* __restrict__ k,
                                                        const typename IO::T* __restrict__ v, int n_tokens,
                                                        int heads, float* __restrict__ partials,
                                                        unsigned short (*s_k)[LINFUSION_TC_STATE_LD],
                                                        unsigned short (*s_v)[LINFUSION_TC_STATE_LD]) {
    typedef LinfusionMma<IO> M;
    constexpr int DM = (D + 15) / 16 * 16;  // kv rows padded to the MMA's M
    constexpr int DN = (D + 7) / 8 * 8;     // kv columns padded to the MMA's N
    constexpr int NT = DN / 8;
    constexpr int THREADS = DM / 16 * 32;
    constexpr int CH = LINFUSION_STATE_CHUNK;
    constexpr int LD = LINFUSION_TC_STATE_LD;
    static_assert(!VEC || (CH == 32 && D % 8 == 0), "VEC: one (token pair, 8 dims) item per thread");

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int split = blockIdx.x;
    const int splits = gridDim.x;
    const int bh = blockIdx.y;
    const LinfusionHead head = linfusion_head(bh, heads, D, n_tokens);
    const long long row_stride = head.row_stride;
    const LinfusionRange range = linfusion_split_range(split, splits, n_tokens);
    const int begin = range.begin, end = range.end;
    const typename IO::T* k_base = k + head.offset;
    const typename IO::T* v_base = v + head.offset;

    float acc[NT + 1][4];
#pragma unroll
    for (int t = 0; t <= NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[t][r] = 0.0f;
    const unsigned int one2 = linfusion_pack2<IO>(1.0f, 1.0f);
    const unsigned int ones[2] = {lane < 4 ? one2 : 0u, lane < 4 ? one2 : 0u};  // B column 0 = 1

    const int tp = tid & 15;
    const int m = tid >> 4;
    const bool dims_ok = 8 * m < D;
    uint4 kr[2], vr[2];
    auto load = [&](int n0) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int t = 2 * tp + s;  // token n0 + t (n0 + t itself may pass 2^31 - 1)
            const uint4 zero = {0u, 0u, 0u, 0u};
            kr[s] = zero;
            vr[s] = zero;
            if (dims_ok && t < end - n0) {
                const long long offset = ((long long)n0 + t) * row_stride + 8 * m;
                kr[s] = linfusion_ldg16(k_base + offset);
                vr[s] = linfusion_ldg16(v_base + offset);
            }
        }
    };
    if constexpr (VEC) {
        if (begin < end) load(begin);
    }

    for (int n0 = begin; n0 < end; n0 = linfusion_next(n0, CH, end)) {
        if constexpr (VEC) {
            const uint4 zero = {0u, 0u, 0u, 0u};
            const uint4 p0 = 2 * tp < end - n0 ? linfusion_phi8<IO>(kr[0]) : zero;  // padding stays 0
            const uint4 p1 = 2 * tp + 1 < end - n0 ? linfusion_phi8<IO>(kr[1]) : zero;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                *reinterpret_cast<unsigned int*>(&s_k[8 * m + u][2 * tp]) = dims_ok ? linfusion_pair(p0, p1, u) : 0u;
                if (8 * m < DN) *reinterpret_cast<unsigned int*>(&s_v[8 * m + u][2 * tp]) = linfusion_pair(vr[0], vr[1], u);
            }
        } else {  // the CUDA-core kernels' batched staging, transposed into the MMA tiles
            linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{k_base, row_stride, n0, end, CH, 0, DM, D},
                                                   THREADS, [&](int t, int i, float x, bool valid) {
                                                       s_k[i][t] = M::bits(valid ? linfusion_phi(x) : 0.0f);
                                                   });
            linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{v_base, row_stride, n0, end, CH, 0, DN, D},
                                                   THREADS, [&](int t, int j, float x, bool) { s_v[j][t] = M::bits(x); });
        }
        __syncthreads();
        if constexpr (VEC) {
            if (end - n0 > CH) load(n0 + CH);  // the next chunk is in flight during the MMAs
        }
#pragma unroll
        for (int k0 = 0; k0 < CH; k0 += 16) {
            unsigned int a[4];
            linfusion_load_a<LD>(s_k, 16 * warp, k0, lane, a);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                unsigned int bb[2];
                linfusion_load_b<LD>(s_v, 8 * t, k0, lane, bb);
                M::mma(acc[t], a, bb);
            }
            M::mma(acc[NT], a, ones);
        }
        __syncthreads();
    }

    const float inv_n = 1.0f / (float)n_tokens;
    float* out = partials + ((long long)bh * splits + split) * (long long)(D * (D + 1));
    const int g = lane >> 2, c2 = 2 * (lane & 3);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = 16 * warp + g + (r >> 1) * 8;
            const int j = 8 * t + c2 + (r & 1);
            if (i < D && j < D) out[i * (D + 1) + j] = acc[t][r] * inv_n;
        }
    if (c2 == 0) {  // column 0 of the ones tile: the phi(k) sums of rows g and g+8
        const int i = 16 * warp + g;
        if (i < D) out[i * (D + 1) + D] = acc[NT][0] * inv_n;
        if (i + 8 < D) out[(i + 8) * (D + 1) + D] = acc[NT][2] * inv_n;
    }
}

template <class IO, int D>
__device__ __forceinline__ void linfusion_state_tc(const typename IO::T* __restrict__ k,
                                                   const typename IO::T* __restrict__ v, int n_tokens, int heads,
                                                   float* __restrict__ partials) {
    __shared__ __align__(16) unsigned short s_k[(D + 15) / 16 * 16][LINFUSION_TC_STATE_LD];
    __shared__ __align__(16) unsigned short s_v[(D + 7) / 8 * 8][LINFUSION_TC_STATE_LD];
    if constexpr (D % 8 == 0) {
        if (((linfusion_address(k) | linfusion_address(v)) & 15u) == 0) {
            linfusion_state_tc_body<IO, D, true>(k, v, n_tokens, heads, partials, s_k, s_v);
            return;
        }
    }
    linfusion_state_tc_body<IO, D, false>(k, v, n_tokens, heads, partials, s_k, s_v);
}

// ---------------------------------------------------------------------------------------------
// apply: block (group, column tile jt, b*h) writes ROWS tokens x TJ columns, TOK tokens per pass.
// The kv tile, plus the mean as column TJ (for z), is converted to the I/O type once per block;
// warp w computes tokens [16w, 16w+16) of each pass. VEC: each thread loads DK/16 16-byte
// vectors of q per pass (the next pass's while the MMAs run), and each warp writes its 16 output
// rows back through its own rows of s_q with 16-byte stores.
// ---------------------------------------------------------------------------------------------
template <class IO, int D, int TJ, int TOK, int ROWS, bool VEC>
__device__ __forceinline__ void linfusion_apply_tc_body(const typename IO::T* __restrict__ q,
                                                        const float* __restrict__ state, int n_tokens, int heads,
                                                        int eps_bits, typename IO::T* __restrict__ out,
                                                        unsigned short (*s_kv)[(D + 15) / 16 * 16 + 8],
                                                        unsigned short (*s_q)[(D + 15) / 16 * 16 + 8]) {
    typedef LinfusionMma<IO> M;
    constexpr int DK = (D + 15) / 16 * 16;  // phi(q) . kv reduces over D, padded to the MMA's K
    constexpr int LD = DK + 8;
    constexpr int NJ = (D + TJ - 1) / TJ;
    constexpr int NT = TJ / 8;              // output tiles; tile NT holds z in its column 0
    constexpr int THREADS = TOK / 16 * 32;
    constexpr int VPR = DK / 8;             // 16-byte vectors per s_q row, padding included
    constexpr int QV = TOK * VPR / THREADS; // = DK / 16 vectors per thread and pass
    constexpr int OV = TJ / 8;              // 16-byte output vectors per token
    static_assert(TOK * VPR % THREADS == 0 && TJ % 8 == 0 && TJ <= LD, "tiling");
    static_assert(TOK * LD * 2 >= (THREADS + 1) * 4, "s_q doubles as the scratch of the kv scale");
    static_assert(!VEC || D % 8 == 0, "VEC needs whole 16-byte vectors");

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int jt = blockIdx.x % NJ;
    const int group = blockIdx.x / NJ;
    const int bh = blockIdx.y;
    const LinfusionHead head = linfusion_head(bh, heads, D, n_tokens);
    const long long row_stride = head.row_stride;
    const int col0 = jt * TJ;
    const int begin = group * ROWS;
    const int end = n_tokens - begin > ROWS ? begin + ROWS : n_tokens;
    const float* st = state + (long long)bh * (D * (D + 1));
    const typename IO::T* q_base = q + head.offset;
    typename IO::T* o_base = out + head.offset;

    uint4 qr[QV];
    auto load = [&](int n0) {
#pragma unroll
        for (int u = 0; u < QV; ++u) {
            const int e = tid + u * THREADS;
            const int t = e / VPR;
            const int i0 = 8 * (e - t * VPR);
            const uint4 zero = {0u, 0u, 0u, 0u};
            qr[u] = zero;
            if (i0 < D && t < end - n0) qr[u] = linfusion_ldg16(q_base + ((long long)n0 + t) * row_stride + i0);
        }
    };
    if constexpr (VEC) load(begin);  // the first pass's q is in flight while kv is converted

    // kv and the mean enter the MMA in the I/O type: scale the tile (and so z and eps) by a power of
    // two that keeps fp16 in its normal range; out = phi(q) kv / z is unchanged.
    auto kv_element = [&](int e) {  // consecutive threads read consecutive columns
        const int i = e / (TJ + 8);
        const int j = e - i * (TJ + 8);
        const int col = j == TJ ? D : col0 + j;  // one address per element: the loads batch up
        const bool ok = i < D && (j == TJ || (j < TJ && col < D));
        return ok ? st[i * (D + 1) + col] : 0.0f;
    };
    float largest = 0.0f;
    for (int e = tid; e < DK * (TJ + 8); e += THREADS) largest = fmaxf(largest, fabsf(kv_element(e)));
    const float scale = linfusion_block_pow2_scale(largest, reinterpret_cast<float*>(&s_q[0][0]), THREADS);
    for (int e = tid; e < DK * (TJ + 8); e += THREADS) s_kv[e % (TJ + 8)][e / (TJ + 8)] = M::bits(scale * kv_element(e));
    const float eps = __int_as_float(eps_bits) * scale;

    const int g = lane >> 2, c2 = 2 * (lane & 3);
    for (int n0 = begin; n0 < end; n0 = linfusion_next(n0, TOK, end)) {
        __syncthreads();  // s_kv is ready; the previous pass is done with s_q
        if constexpr (VEC) {
#pragma unroll
            for (int u = 0; u < QV; ++u) {
                const int e = tid + u * THREADS;
                const int t = e / VPR;
                const int i0 = 8 * (e - t * VPR);
                const uint4 zero = {0u, 0u, 0u, 0u};
                *reinterpret_cast<uint4*>(&s_q[t][i0]) = (i0 < D && t < end - n0) ? linfusion_phi8<IO>(qr[u]) : zero;
            }
        } else {
            linfusion_stage<LINFUSION_STAGE_BATCH>(LinfusionTile<IO>{q_base, row_stride, n0, end, TOK, 0, DK, D},
                                                   THREADS, [&](int t, int i, float x, bool valid) {
                                                       s_q[t][i] = M::bits(valid ? linfusion_phi(x) : 0.0f);
                                                   });
        }
        __syncthreads();
        if constexpr (VEC) {
            if (end - n0 > TOK) load(n0 + TOK);  // the next pass is in flight during the MMAs
        }
        float acc[NT + 1][4];
#pragma unroll
        for (int t = 0; t <= NT; ++t)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[t][r] = 0.0f;
#pragma unroll
        for (int k0 = 0; k0 < DK; k0 += 16) {
            unsigned int a[4];
            linfusion_load_a<LD>(s_q, 16 * warp, k0, lane, a);
#pragma unroll
            for (int t = 0; t <= NT; ++t) {
                unsigned int bb[2];
                linfusion_load_b<LD>(s_kv, 8 * t, k0, lane, bb);
                M::mma(acc[t], a, bb);
            }
        }
        // z of rows g and g+8 sits in column 0 of tile NT, held by lane 4g.
        const float inv_lo = 1.0f / (__shfl_sync(0xffffffffu, acc[NT][0], lane & ~3) + eps);
        const float inv_hi = 1.0f / (__shfl_sync(0xffffffffu, acc[NT][2], lane & ~3) + eps);
        if constexpr (VEC) {
            __syncwarp();  // the warp has read its A fragments: its s_q rows are free
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                *reinterpret_cast<unsigned int*>(&s_q[16 * warp + g][8 * t + c2]) =
                    linfusion_pack2<IO>(acc[t][0] * inv_lo, acc[t][1] * inv_lo);
                *reinterpret_cast<unsigned int*>(&s_q[16 * warp + g + 8][8 * t + c2]) =
                    linfusion_pack2<IO>(acc[t][2] * inv_hi, acc[t][3] * inv_hi);
            }
            __syncwarp();
            for (int e = lane; e < 16 * OV; e += 32) {
                const int r = e / OV;
                const int cv = e - r * OV;
                const int t = 16 * warp + r;  // token n0 + t
                if (t < end - n0 && col0 + 8 * cv < D)
                    *reinterpret_cast<uint4*>(o_base + ((long long)n0 + t) * row_stride + col0 + 8 * cv) =
                        *reinterpret_cast<const uint4*>(&s_q[16 * warp + r][8 * cv]);
            }
        } else {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int tn = 16 * warp + g + (r >> 1) * 8;  // token n0 + tn
                if (tn >= end - n0) continue;
                const float inv_z = (r >> 1) ? inv_hi : inv_lo;
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int j = 8 * t + c2 + (r & 1);
                    if (j < TJ && col0 + j < D) IO::store(o_base + ((long long)n0 + tn) * row_stride + col0 + j,
                                                          acc[t][r] * inv_z);
                }
            }
        }
    }
}

template <class IO, int D, int TJ, int TOK, int ROWS>
__device__ __forceinline__ void linfusion_apply_tc(const typename IO::T* __restrict__ q,
                                                   const float* __restrict__ state, int n_tokens, int heads,
                                                   int eps_bits, typename IO::T* __restrict__ out) {
    constexpr int LD = (D + 15) / 16 * 16 + 8;
    __shared__ __align__(16) unsigned short s_kv[TJ + 8][LD];  // kv^T: [column][i]; row TJ = mean
    __shared__ __align__(16) unsigned short s_q[TOK][LD];      // phi(q): [token][i]; then the output
    if constexpr (D % 8 == 0) {
        if (((linfusion_address(q) | linfusion_address(out)) & 15u) == 0) {
            linfusion_apply_tc_body<IO, D, TJ, TOK, ROWS, true>(q, state, n_tokens, heads, eps_bits, out, s_kv, s_q);
            return;
        }
    }
    linfusion_apply_tc_body<IO, D, TJ, TOK, ROWS, false>(q, state, n_tokens, heads, eps_bits, out, s_kv, s_q);
}

// Tensor-core entry points for one (dtype, head dim): fp16 / bf16, head dims up to 192 (the state
// kernel keeps D x D accumulators in registers). Block sizes: state ceil16(D) / 16 warps,
// apply TOK / 16 warps (two blocks per SM requested).
#define LINFUSION_DEFINE_TC_KERNELS(SUFFIX, IO, D, TJ, TOK, ROWS)                                             \
    extern "C" __global__ void __launch_bounds__((((D) + 15) / 16) * 32, 1)                                     \
    linfusion_la_state_tc_##SUFFIX##_d##D(const IO::T* __restrict__ k, const IO::T* __restrict__ v,          \
                                          int n_tokens, int heads, float* __restrict__ partials) {            \
        linfusion_state_tc<IO, D>(k, v, n_tokens, heads, partials);                                          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(((TOK) / 16) * 32, 2)                                          \
    linfusion_la_apply_tc_##SUFFIX##_d##D(const IO::T* __restrict__ q, const float* __restrict__ state,       \
                                          int n_tokens, int heads, int eps_bits, IO::T* __restrict__ out) {   \
        linfusion_apply_tc<IO, D, TJ, TOK, ROWS>(q, state, n_tokens, heads, eps_bits, out);                  \
    }

// A further apply entry point with another tiling (the tensor-core-wide tactic), named in full.
#define LINFUSION_DEFINE_TC_APPLY_KERNEL(NAME, IO, D, TJ, TOK, ROWS)                                         \
    extern "C" __global__ void __launch_bounds__(((TOK) / 16) * 32, 2)                                          \
    NAME(const IO::T* __restrict__ q, const float* __restrict__ state, int n_tokens, int heads, int eps_bits,  \
         IO::T* __restrict__ out) {                                                                           \
        linfusion_apply_tc<IO, D, TJ, TOK, ROWS>(q, state, n_tokens, heads, eps_bits, out);                  \
    }

#else
#define LINFUSION_DEFINE_TC_KERNELS(SUFFIX, IO, D, TJ, TOK, ROWS)
#define LINFUSION_DEFINE_TC_APPLY_KERNEL(NAME, IO, D, TJ, TOK, ROWS)
#endif
