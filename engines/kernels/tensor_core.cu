// Warp-level tensor-core building blocks for linear_attention_tc.cu (sm_80+): mma.sync
// m16n8k16 with float32 accumulators for fp16 and bf16, fragment loads from K-contiguous shared
// tiles, and 16-byte vector helpers. Appended after linear_attention.cu (I/O traits, phi,
// conversions) and before linear_attention_tc.cu.
//
// Fragment layouts follow the PTX ISA for mma.m16n8k16 (.f16/.bf16, row.col, f32 accumulators),
// with g = lane / 4 and c = lane % 4:
//   A (16x16, row-major) : a[0] = (g, 2c..2c+1)  a[1] = (g+8, 2c..)  a[2] = (g, 2c+8..)  a[3] = (g+8, 2c+8..)
//   B (16x8, col-major)  : b[0] = (2c..2c+1, g)  b[1] = (2c+8..2c+9, g)
//   C (16x8, float32)    : c[0..1] = (g, 2c..2c+1)  c[2..3] = (g+8, 2c..2c+1)
// Each 32-bit register holds two consecutive K elements, the lower index in the low half. Shared
// tiles keep K contiguous with a row stride of 4 (mod 8) 32-bit words, so the eight rows a
// fragment load touches fall in distinct banks and every register is one aligned 32-bit load.
// The host emulation (tests) replaces the two inline-PTX MMAs with a warp-exchange model.

#if defined(LINFUSION_HOST_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LINFUSION_TENSOR_CORES 1


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

// A power of two that brings the block's largest magnitude into [2^13, 2^14): fp16 then neither
// overflows (65504) nor drops to subnormals for the values that matter. local: this thread's
// max |x|; scratch: threads + 1 floats of shared memory, free until the caller's next barrier.
// A zero or infinite maximum gives 1 (fmaxf skips NaNs; NaN and inf elements propagate through
// the MMA as they would unscaled). Below 2^-114 the scale is capped at 2^127.
__device__ __forceinline__ float linfusion_block_pow2_scale(float local, float* scratch, int threads) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    scratch[tid] = local;
    __syncthreads();
    if (tid < 32) {
        float m = 0.0f;
        for (int t = lane; t < threads; t += 32) m = fmaxf(m, scratch[t]);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_sync(0xffffffffu, m, lane ^ offset));
        if (lane == 0) scratch[threads] = m;
    }
    __syncthreads();
    const float m = scratch[threads];
    if (!(m > 0.0f) || m > __int_as_float(0x7f7fffff)) return 1.0f;  // zero or inf (> FLT_MAX)
    const int exponent = (int)((__float_as_uint(m) >> 23) & 0xffu) - 127;  // floor(log2 m) for normal m
    const int k = max(-126, min(127, 13 - exponent));
    return __int_as_float((127 + k) << 23);
}

// --- 16-byte vectors of eight 16-bit values ---------------------------------------------------

__device__ __forceinline__ unsigned long long linfusion_address(const void* p) {
    return (unsigned long long)p;
}
__device__ __forceinline__ uint4 linfusion_ldg16(const unsigned short* p) {
    return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ unsigned int linfusion_word(const uint4& a, int u) {  // u in 0..3, unrolled
    return u == 0 ? a.x : u == 1 ? a.y : u == 2 ? a.z : a.w;
}
// Element u (0..7) of token t's vector a and of token t+1's vector b as one K-pair word:
// low half a[u], high half b[u] (the layout of an A row or a B column in the state kernel).
__device__ __forceinline__ unsigned int linfusion_pair(const uint4& a, const uint4& b, int u) {
    const unsigned int wa = linfusion_word(a, u >> 1), wb = linfusion_word(b, u >> 1);
    return (u & 1) ? ((wa >> 16) | (wb & 0xffff0000u)) : ((wa & 0xffffu) | (wb << 16));
}
template <class IO>
__device__ __forceinline__ unsigned int linfusion_phi2(unsigned int w) {
    typedef LinfusionMma<IO> M;
    const float lo = linfusion_phi(M::value((unsigned short)(w & 0xffffu)));
    const float hi = linfusion_phi(M::value((unsigned short)(w >> 16)));
    return (unsigned int)M::bits(lo) | ((unsigned int)M::bits(hi) << 16);
}
template <class IO>
__device__ __forceinline__ uint4 linfusion_phi8(const uint4& a) {
    uint4 r;
    r.x = linfusion_phi2<IO>(a.x);
    r.y = linfusion_phi2<IO>(a.y);
    r.z = linfusion_phi2<IO>(a.z);
    r.w = linfusion_phi2<IO>(a.w);
    return r;
}
template <class IO>
__device__ __forceinline__ unsigned int linfusion_pack2(float lo, float hi) {
    typedef LinfusionMma<IO> M;
    return (unsigned int)M::bits(lo) | ((unsigned int)M::bits(hi) << 16);
}

#endif
