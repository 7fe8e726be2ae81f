// The SIMD layer of the CPU kernels: vectors of W floats (GCC/Clang vector extensions), the x86-64 levels and the
// run-time pick among them (RLHFV_LEVELS), lane helpers, bf16/fp16 loads and stores, and the libm-free exp.
// Torch-free: c10's header-only bf16/half types are all it needs, so the chunk sweeps built on it (sweeps.h) compile
// without ATen for other targets (tests/build/sweeps_check.cpp, aarch64 under an emulator) and alone
// (benchmarks/sweeps_bench.cpp). Internal linkage (an anonymous namespace): one translation unit per binary includes
// it.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rlhfv {
namespace {


// The hot loops use GCC/Clang vector extensions of W floats, W the native width of each x86-64 level: 16 on AVX-512
// (x86-64-v4), 8 on AVX2 (v3), 4 on the baseline. Each kernel is a template on W, compiled once per level (target
// attributes) and picked once at run time by the test GCC's target_clones resolver makes (cpu_level), so one build is
// fast on every machine. (A 16-float vector under AVX2 was split lane by lane through memory: 5x slower than 8
// floats. Plain loops with reductions do not vectorize without -ffast-math.) bf16 conversions, plain loops that
// vectorize on their own, keep target_clones.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHFV_X86_LEVELS 1
#define RLHFV_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHFV_X86_LEVELS 0
#define RLHFV_MULTIVERSION
#endif
#define RLHFV_INLINE __attribute__((always_inline)) inline

constexpr int64_t kChunk = 2048;  // floats per chunk: 8 KiB, stays in L1 between the max and the exp sweep

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(W * sizeof(float))));
};

// RLHFV_LEVELS(ret, name, (params), (args)) defines `ret name(params)`, which runs name_body<W>(args) compiled for the
// widest x86-64 level this CPU has: W = 16 under AVX-512, 8 under AVX2 and FMA, 4 on the baseline. The environment
// variable RLHFV_CPU_LEVEL=v4|v3|baseline, read once, picks a lower one (tests run every level on one machine; a level
// above the CPU's is never picked). kV4Bf16 is x86-64-v4 with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later,
// Zen 4 and later): its one instruction rounds 16 floats to bf16, where the plain v4 code takes eight (the bf16
// kernels' stores, RLHFV_BF16_LEVELS); every other kernel runs the v4 code there.
#if RLHFV_X86_LEVELS
enum class CpuLevel { kV4Bf16, kV4, kV3, kBaseline };
inline CpuLevel cpu_level() {
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    const bool v4 = __builtin_cpu_supports("x86-64-v4");
    CpuLevel have = v4 && __builtin_cpu_supports("avx512bf16") ? CpuLevel::kV4Bf16
                    : v4                                       ? CpuLevel::kV4
                    : __builtin_cpu_supports("x86-64-v3")      ? CpuLevel::kV3
                                                               : CpuLevel::kBaseline;
    const char* asked = std::getenv("RLHFV_CPU_LEVEL");
    CpuLevel want = CpuLevel::kV4Bf16;
    if (asked != nullptr && std::strcmp(asked, "v4") == 0) want = CpuLevel::kV4;
    if (asked != nullptr && std::strcmp(asked, "v3") == 0) want = CpuLevel::kV3;
    if (asked != nullptr && std::strcmp(asked, "baseline") == 0) want = CpuLevel::kBaseline;
    return static_cast<int>(want) > static_cast<int>(have) ? want : have;
  }();
  return level;
}
#define RLHFV_LEVELS(ret, name, params, args)                                                    \
  __attribute__((target("arch=x86-64-v4"))) ret name##_v4 params { return name##_body<16> args; } \
  __attribute__((target("arch=x86-64-v3"))) ret name##_v3 params { return name##_body<8> args; }  \
  ret name##_baseline params { return name##_body<4> args; }                                      \
  ret name params {                                                                               \
    switch (cpu_level()) {                                                                        \
      case CpuLevel::kV4Bf16:                                                                     \
      case CpuLevel::kV4: return name##_v4 args;                                                  \
      case CpuLevel::kV3: return name##_v3 args;                                                  \
      default: return name##_baseline args;                                                       \
    }                                                                                             \
  }
// The same for kernels that store bf16: name_body<W, native_bf16>, native_bf16 true on kV4Bf16 alone.
#define RLHFV_BF16_LEVELS(ret, name, params, args)                                                                  \
  __attribute__((target("arch=x86-64-v4,avx512bf16"))) ret name##_v4bf16 params {                                  \
    return name##_body<16, true> args;                                                                             \
  }                                                                                                                \
  __attribute__((target("arch=x86-64-v4"))) ret name##_v4 params { return name##_body<16, false> args; }           \
  __attribute__((target("arch=x86-64-v3"))) ret name##_v3 params { return name##_body<8, false> args; }            \
  ret name##_baseline params { return name##_body<4, false> args; }                                                \
  ret name params {                                                                                                \
    switch (cpu_level()) {                                                                                         \
      case CpuLevel::kV4Bf16: return name##_v4bf16 args;                                                           \
      case CpuLevel::kV4: return name##_v4 args;                                                                   \
      case CpuLevel::kV3: return name##_v3 args;                                                                   \
      default: return name##_baseline args;                                                                        \
    }                                                                                                              \
  }
#else
#define RLHFV_LEVELS(ret, name, params, args) \
  ret name params { return name##_body<8> args; }  // aarch64: two NEON registers per vector
#define RLHFV_BF16_LEVELS(ret, name, params, args) \
  ret name params { return name##_body<8, false> args; }
#endif

// The same source serves one float and a vector of them.
template <typename F>
struct Lanes {
  typedef int32_t Int __attribute__((vector_size(sizeof(F))));
  static RLHFV_INLINE F splat(float x) { return F{} + x; }
};
template <>
struct Lanes<float> {
  using Int = int32_t;
  static RLHFV_INLINE float splat(float x) { return x; }
};

// A constant the optimizer cannot see through. GCC 12 compiles `x < lo ? lo : x` to one max instruction only when lo
// is not a known constant; with one it emits a compare and a blend, two instructions on the FMA ports that bound these
// loops. (The max keeps NaN: x86's max returns its second operand, here x, when either is NaN.) The empty asm is not
// volatile, so the constant is still built once, outside the loop. Only where each level's vector is one register
// (GCC on x86); elsewhere (aarch64: a vector is two NEON registers, which no asm constraint names) it is a plain splat.
template <typename F>
RLHFV_INLINE F opaque_splat(float x) {
  F v = Lanes<F>::splat(x);
#if RLHFV_X86_LEVELS
  __asm__("" : "+x"(v));
#endif
  return v;
}

// The max and the sum of a vector's lanes by halves (16 -> 8 -> 4 -> 2 -> 1): four dependent steps where a lane-by-lane
// loop took sixteen, each waiting ~4 cycles for the last; at the end of every 2048-logit chunk sweep that wait was
// most of the max sweep's time (256 of its ~350 cycles with four accumulators). combine(a, b) works on halves and on
// single floats alike.
template <typename F, typename Combine>
RLHFV_INLINE float lanes_reduce(F v, const Combine& combine) {
  constexpr int kLanes = sizeof(F) / sizeof(float);
  if constexpr (kLanes == 2) {
    return combine(v[0], v[1]);
  } else {
    using Half = typename Vec<kLanes / 2>::F;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return lanes_reduce(combine(lo, hi), combine);
  }
}
template <typename F>
RLHFV_INLINE float lanes_max(F v) {
  return lanes_reduce(v, [](auto a, auto b) { return b > a ? b : a; });
}
template <typename F>
RLHFV_INLINE float lanes_sum(F v) {
  return lanes_reduce(v, [](auto a, auto b) { return a + b; });
}

// max(x, lo) that keeps NaN.
template <typename F>
RLHFV_INLINE F clamp_below(F x, float lo) {
  const F bound = opaque_splat<F>(lo);
  return x < bound ? bound : x;
}

// x / temp, skipped when temp is 1 (`scaled` false): a vector division per logit costs as much as the exp's
// polynomial. The branch is loop-invariant; GCC unswitches the loops around it.
template <typename F>
RLHFV_INLINE F over_temp(F x, float temp, bool scaled) {
  return scaled ? x / Lanes<F>::splat(temp) : x;
}

template <typename F>
RLHFV_INLINE F load_lanes(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename F>
RLHFV_INLINE void store_lanes(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }

// bf16 lanes: widened to fp32 on load; on store rounded to nearest even with NaN -> 0x7FC0, c10's conversion, bit for
// bit. `native` (kV4Bf16, 16 lanes): AVX512-BF16's vcvtneps2bf16, one instruction for the eight of the bit operations
// (the bf16 backward -15 to -20% on a Xeon with it). It rounds the same, but keeps a NaN's sign and payload (still a
// quiet NaN) and flushes fp32 subnormals (|v| < 1.2e-38) to zero, where c10 rounds them to bf16 subnormals.
template <typename F>
struct Bf16Lanes {
  typedef uint16_t Bits __attribute__((vector_size(sizeof(F) / 2)));
  typedef uint32_t Wide __attribute__((vector_size(sizeof(F))));
};
template <typename F>
RLHFV_INLINE F load_lanes(const c10::BFloat16* p) {
  if constexpr (std::is_same_v<F, float>) {
    const uint32_t wide = static_cast<uint32_t>(p->x) << 16;
    float v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
  } else {
    typename Bf16Lanes<F>::Bits bits;
    std::memcpy(&bits, p, sizeof(bits));
    const auto wide = __builtin_convertvector(bits, typename Bf16Lanes<F>::Wide) << 16;
    F v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
  }
}
template <typename F, bool native = false>
RLHFV_INLINE void store_lanes(c10::BFloat16* p, F v) {
  if constexpr (std::is_same_v<F, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    p->x = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#if RLHFV_X86_LEVELS
  } else if constexpr (native) {
    static_assert(sizeof(F) == 64, "vcvtneps2bf16 is used on 16 floats");
    __m256i bits;  // asm, not the intrinsic: it would need avx512bf16 on every function it is inlined through
    __asm__("vcvtneps2bf16 %1, %0" : "=v"(bits) : "v"(v));
    std::memcpy(p, &bits, sizeof(bits));
#endif
  } else {
    typename Bf16Lanes<F>::Wide u;
    std::memcpy(&u, &v, sizeof(u));
    const typename Bf16Lanes<F>::Wide quiet_nan = u - u + 0x7FC0u;
    const auto rounded = v != v ? quiet_nan : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const auto bits = __builtin_convertvector(rounded, typename Bf16Lanes<F>::Bits);
    std::memcpy(p, &bits, sizeof(bits));
  }
}

// exp(x) for x <= ~0 without libm: x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial fitted for
// least maximum relative error on that interval (1 and 1 kept as its first two coefficients, so exp(0) = 1 exactly;
// 2e-9 in exact arithmetic, below 1e-7 evaluated in fp32, like a degree-7 Taylor polynomial with one FMA more in the
// latency chain that bounds these loops), 2^n by building the float's exponent bits. NaN propagates; x below -87 is
// clamped (the result, ~1e-38, is negligible next to the row's largest term, 1). Every caller passes x <= ~0 by
// construction (a logit minus the row's max or LSE, -2|u|), so there is no upper clamp (it cost 6% of the sweep):
// x > 88 would give garbage, not inf.
// In two halves (exp_reduce, then exp_finish) so that a loop can reduce the next vectors while it finishes these:
// on Zen 2 the sweeps are bound by how many of the chain's ~15 dependent operations wait in the FP scheduler, not by
// the FMA ports (see DESIGN.md §5), and the pipelined loops below are 10% faster for the same results, bit for bit.
template <typename F>
struct ExpReduced {
  F r, scale;  // exp(x) = p(r) * scale, scale = 2^n
};
template <typename F>
RLHFV_INLINE ExpReduced<F> exp_reduce(F x) {
  using L = Lanes<F>;
  x = clamp_below(x, -87.0f);
  const F round = L::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa
  const F t = x * L::splat(1.44269504088896341f) + round;
  const F n = t - round;
  F r = x - n * L::splat(0.693145751953125f);  // ln2 split in two so n*ln2_hi is exact
  r = r - n * L::splat(1.428606765330187e-06f);
  typename L::Int bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return {r, scale};
}
template <typename F>
RLHFV_INLINE F exp_finish(ExpReduced<F> e) {
  using L = Lanes<F>;
  const F r = e.r;
  F p = L::splat(1.3843652559444308e-3f);
  p = p * r + L::splat(8.37415549904108e-3f);
  p = p * r + L::splat(4.166800156235695e-2f);
  p = p * r + L::splat(0.16666431725025177f);
  p = p * r + L::splat(0.4999999403953552f);
  p = p * r + L::splat(1.0f);
  p = p * r + L::splat(1.0f);
  return p * e.scale;
}
template <typename F>
RLHFV_INLINE F exp_nonpositive(F x) {
  return exp_finish(exp_reduce(x));
}
// exp_finish for results that are rounded to bf16 next (the backward's gradient in the logits' dtype): a degree-4
// polynomial fitted the same way, 5.4e-6 relative error, 1/360 of bf16's half-ulp, two FMAs fewer in the chain
// (bf16 fwd+bwd -8%). It rounds to the same bf16 as the degree-6 one but for ~0.05% of values, which then differ by
// one ulp. Not for fp16: its ulp is 8x finer, and the extra flips, summed by the fused-linear path's weight
// gradient, pushed one of 7224 entries past the fp16 criterion (RLHFV_TEST_SEED=1395408827).
template <typename F>
RLHFV_INLINE F exp_finish_coarse(ExpReduced<F> e) {
  using L = Lanes<F>;
  const F r = e.r;
  F p = L::splat(0.041277289390563965f);
  p = p * r + L::splat(0.16753435134887695f);
  p = p * r + L::splat(0.5000511407852173f);
  p = p * r + L::splat(1.0f);
  p = p * r + L::splat(1.0f);
  return p * e.scale;
}

// Which level's kernels this CPU runs (RLHFV_LEVELS), so that benchmarks can say which code they timed
// (rlhfv_kernels.cpu_kernel_variant(), through logprob_cpu.cpp's rlhfv_cpu_variant).
inline const char* cpu_variant_name() {
#if RLHFV_X86_LEVELS
  switch (cpu_level()) {
    case CpuLevel::kV4Bf16: return "x86-64-v4 (AVX-512) + AVX512-BF16";
    case CpuLevel::kV4: return "x86-64-v4 (AVX-512)";
    case CpuLevel::kV3: return "x86-64-v3 (AVX2, FMA)";
    default: return "x86-64 baseline (SSE2)";
  }
#elif defined(__aarch64__)
  return "aarch64 (NEON)";
#else
  return "one build for this target (no per-level variants)";
#endif
}

}  // namespace
}  // namespace rlhfv
