// Tensor-core variants of the state and apply kernels, for fp16 and bf16 I/O (sm_80+).
//
// Why: with float32 CUDA-core FMAs both kernels do 2*D^2 flops per token and head for 4*D
// bytes of fp16 traffic (D/2 flops per byte), which is compute bound on CUDA cores for D >= 64.
// mma.sync.m16n8k16 with float32 accumulation moves the D^2 products onto the tensor cores.
//
// Same contract as the CUDA-core kernels in linear_attention.cu (this file is appended to it):
// the same argument lists, the same float32 partials [B, H, S, D, D+1] and state, the same
// number of splits S; only the launch geometry differs (linfusion.engines.kernels). The plugins
// offer both as TensorRT tactics for fp16/bf16 and TensorRT times them at build time.
//
// Precision: phi(k), v, phi(q) and kv are rounded to the I/O type for the products (v and the
// I/O already are); every sum is float32. The normaliser z = phi(q) . mean is computed by the
// same MMA as an extra kv column, so numerator and denominator see the same rounded phi(q).
//
// Fragment layouts follow the PTX ISA for mma.m16n8k16 (.f16/.bf16, row.col, f32 accumulators),
// with g = lane / 4 and c = lane % 4:
//   A (16x16, row-major) : a[0] = (g, 2c..2c+1)  a[1] = (g+8, 2c..)  a[2] = (g, 2c+8..)  a[3] = (g+8, 2c+8..)
//   B (16x8, col-major)  : b[0] = (2c..2c+1, g)  b[1] = (2c+8..2c+9, g)
//   C (16x8, float32)    : c[0..1] = (g, 2c..2c+1)  c[2..3] = (g+8, 2c..2c+1)
// Each 32-bit register holds two consecutive K elements, the lower index in the low half. The
// shared-memory tiles are stored so that every fragment register is one aligned 32-bit load:
// rows of K-contiguous halves with a row stride of 8 (mod 16) words, which is bank-conflict free.

#if defined(LINFUSION_HOST_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

__device__ __forceinline__ unsigned int linfusion_ld32(const unsigned short* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

template <class IO> struct LinfusionMma;
template <> struct LinfusionMma<LinfusionF16> {
    static __device__ __forceinline__ unsigned short bits(float x) { return linfusion_float_to_half(x); }
    static __device__ __forceinline__ float value(unsigned short h) { return linfusion_half_to_float(h); }
    static __device__ __forceinline__ void mma(float* c, const unsigned int* a, const unsigned int* b) {
#ifdef LINFUSION_HOST_EMULATION
        linfusion_host_mma_m16n8k16(false, c, a, b);
#else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};
template <> struct LinfusionMma<LinfusionBF16> {
    static __device__ __forceinline__ unsigned short bits(float x) { return linfusion_float_to_bf16(x); }
    static __device__ __forceinline__ float value(unsigned short h) { return linfusion_bf16_to_float(h); }
    static __device__ __forceinline__ void mma(float* c, const unsigned int* a, const unsigned int* b) {
#ifdef LINFUSION_HOST_EMULATION
        linfusion_host_mma_m16n8k16(true, c, a, b);
#else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

// Loads the A fragment of rows [row0, row0+16) and K columns [k0, k0+16) of a K-contiguous tile.
template <int LD>
__device__ __forceinline__ void linfusion_load_a(const unsigned short (*tile)[LD], int row0, int k0, int lane,
                                                 unsigned int* a) {
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    a[0] = linfusion_ld32(&tile[row0 + g][k0 + c2]);
    a[1] = linfusion_ld32(&tile[row0 + g + 8][k0 + c2]);
    a[2] = linfusion_ld32(&tile[row0 + g][k0 + c2 + 8]);
    a[3] = linfusion_ld32(&tile[row0 + g + 8][k0 + c2 + 8]);
}

// Loads the B fragment of N columns [col0, col0+8) and K rows [k0, k0+16), stored transposed
// (one tile row per N column, K contiguous).
template <int LD>
__device__ __forceinline__ void linfusion_load_b(const unsigned short (*tile)[LD], int col0, int k0, int lane,
                                                 unsigned int* b) {
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    b[0] = linfusion_ld32(&tile[col0 + g][k0 + c2]);
    b[1] = linfusion_ld32(&tile[col0 + g][k0 + c2 + 8]);
}

// ---------------------------------------------------------------------------------------------
// state (tensor cores): one block per (split, b*h) covers the whole D x D kv and the phi(k) sum.
// Warp w owns kv rows [16w, 16w+16) and all columns: NT = DN/8 accumulator tiles.
// ---------------------------------------------------------------------------------------------
template <class IO, int D>
__device__ __forceinline__ void linfusion_state_tc(const typename IO::T* __restrict__ k,
                                                   const typename IO::T* __restrict__ v, int n_tokens, int heads,
                                                   float* __restrict__ partials) {
    typedef LinfusionMma<IO> M;
    constexpr int DM = (D + 15) / 16 * 16;  // kv rows padded to the MMA's M
    constexpr int DN = (D + 7) / 8 * 8;     // kv columns padded to the MMA's N
    constexpr int NT = DN / 8;
    constexpr int THREADS = DM / 16 * 32;
    constexpr int CH = LINFUSION_STATE_CHUNK;  // tokens per stage: CH / 16 MMA k-steps
    constexpr int LD = CH + 8;
    __shared__ __align__(16) unsigned short s_k[DM][LD];  // phi(k)^T: [row i][token]
    __shared__ __align__(16) unsigned short s_v[DN][LD];  // v^T:      [column j][token]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int split = blockIdx.x;
    const int splits = gridDim.x;
    const int bh = blockIdx.y;
    const int b = bh / heads;
    const int h = bh - b * heads;
    const long long row_stride = (long long)heads * D;
    const int per_split = (n_tokens + splits - 1) / splits;
    const int begin = split * per_split;
    const int end = min(n_tokens, begin + per_split);
    const typename IO::T* k_base = k + (long long)b * n_tokens * row_stride + h * D;
    const typename IO::T* v_base = v + (long long)b * n_tokens * row_stride + h * D;

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[t][r] = 0.0f;
    float ksum = 0.0f;

    for (int n0 = begin; n0 < end; n0 += CH) {
        for (int e = tid; e < CH * DM; e += THREADS) {
            const int t = e / DM;
            const int i = e - t * DM;
            const int n = n0 + t;
            float x = 0.0f;
            if (i < D && n < end) x = linfusion_phi(IO::load(k_base + (long long)n * row_stride + i));
            s_k[i][t] = M::bits(x);
        }
        for (int e = tid; e < CH * DN; e += THREADS) {
            const int t = e / DN;
            const int j = e - t * DN;
            const int n = n0 + t;
            float x = 0.0f;
            if (j < D && n < end) x = IO::load(v_base + (long long)n * row_stride + j);
            s_v[j][t] = M::bits(x);
        }
        __syncthreads();
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
        }
        if (tid < D) {
#pragma unroll 8
            for (int t = 0; t < CH; ++t) ksum += M::value(s_k[tid][t]);
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
    if (tid < D) out[tid * (D + 1) + D] = ksum * inv_n;
}

// ---------------------------------------------------------------------------------------------
// apply (tensor cores): block (group, column tile jt, b*h) writes ROWS tokens x TJ columns, TOK
// tokens per pass. The kv tile (plus the mean as column TJ, for z) is converted once per block;
// warp w computes tokens [16w, 16w+16) of each pass.
// ---------------------------------------------------------------------------------------------
template <class IO, int D, int TJ, int TOK, int ROWS>
__device__ __forceinline__ void linfusion_apply_tc(const typename IO::T* __restrict__ q,
                                                   const float* __restrict__ state, int n_tokens, int heads,
                                                   int eps_bits, typename IO::T* __restrict__ out) {
    typedef LinfusionMma<IO> M;
    constexpr int DK = (D + 15) / 16 * 16;  // phi(q) . kv reduces over D, padded to the MMA's K
    constexpr int LD = DK + 8;
    constexpr int NJ = (D + TJ - 1) / TJ;
    constexpr int NT = TJ / 8;              // output tiles; tile NT holds z in its column 0
    constexpr int THREADS = TOK / 16 * 32;
    __shared__ __align__(16) unsigned short s_kv[TJ + 8][LD];  // kv^T: [column][i]; row TJ = mean
    __shared__ __align__(16) unsigned short s_q[TOK][LD];      // phi(q): [token][i]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int jt = blockIdx.x % NJ;
    const int group = blockIdx.x / NJ;
    const int bh = blockIdx.y;
    const int b = bh / heads;
    const int h = bh - b * heads;
    const long long row_stride = (long long)heads * D;
    const int col0 = jt * TJ;
    const int begin = group * ROWS;
    const int end = min(n_tokens, begin + ROWS);
    const float eps = __int_as_float(eps_bits);
    const float* st = state + (long long)bh * (D * (D + 1));
    const typename IO::T* q_base = q + (long long)b * n_tokens * row_stride + h * D;
    typename IO::T* o_base = out + (long long)b * n_tokens * row_stride + h * D;

    for (int e = tid; e < DK * (TJ + 8); e += THREADS) {  // consecutive threads read consecutive columns
        const int i = e / (TJ + 8);
        const int j = e - i * (TJ + 8);
        const int col = col0 + j;
        float x = 0.0f;
        if (i < D) {
            if (j < TJ && col < D) x = st[i * (D + 1) + col];
            else if (j == TJ) x = st[i * (D + 1) + D];
        }
        s_kv[j][i] = M::bits(x);
    }

    const int g = lane >> 2, c2 = 2 * (lane & 3);
    for (int n0 = begin; n0 < end; n0 += TOK) {
        __syncthreads();  // s_kv is ready; the previous pass is done with s_q
        for (int e = tid; e < TOK * DK; e += THREADS) {
            const int t = e / DK;
            const int i = e - t * DK;
            const int n = n0 + t;
            float x = 0.0f;
            if (i < D && n < end) x = linfusion_phi(IO::load(q_base + (long long)n * row_stride + i));
            s_q[t][i] = M::bits(x);
        }
        __syncthreads();
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
        const float z_lo = __shfl_sync(0xffffffffu, acc[NT][0], lane & ~3) + eps;
        const float z_hi = __shfl_sync(0xffffffffu, acc[NT][2], lane & ~3) + eps;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int n = n0 + 16 * warp + g + (r >> 1) * 8;
            if (n >= end) continue;
            const float inv_z = 1.0f / ((r >> 1) ? z_hi : z_lo);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const int col = col0 + 8 * t + c2 + (r & 1);
                if (col < D && 8 * t + c2 + (r & 1) < TJ) IO::store(o_base + (long long)n * row_stride + col, acc[t][r] * inv_z);
            }
        }
    }
}

// Tensor-core entry points for one (dtype, head dim): fp16 / bf16 only. Block sizes: state
// ceil16(D) / 16 warps, apply TOK / 16 warps.
#define LINFUSION_DEFINE_TC_KERNELS(SUFFIX, IO, D, TJ, TOK, ROWS)                                             \
    extern "C" __global__ void __launch_bounds__((((D) + 15) / 16) * 32, 1)                                     \
    linfusion_la_state_tc_##SUFFIX##_d##D(const IO::T* __restrict__ k, const IO::T* __restrict__ v,          \
                                          int n_tokens, int heads, float* __restrict__ partials) {            \
        linfusion_state_tc<IO, D>(k, v, n_tokens, heads, partials);                                          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(((TOK) / 16) * 32, 1)                                          \
    linfusion_la_apply_tc_##SUFFIX##_d##D(const IO::T* __restrict__ q, const float* __restrict__ state,       \
                                          int n_tokens, int heads, int eps_bits, IO::T* __restrict__ out) {   \
        linfusion_apply_tc<IO, D, TJ, TOK, ROWS>(q, state, n_tokens, heads, eps_bits, out);                  \
    }

#else
#define LINFUSION_DEFINE_TC_KERNELS(SUFFIX, IO, D, TJ, TOK, ROWS)
#endif
