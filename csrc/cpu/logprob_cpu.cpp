// CPU kernels of the logits path: per-token log-probabilities (forward) and dlogits (backward).
//
// Each row of V logits is read in L1-sized chunks: one pass keeps a running (max, sum of exp) pair, so no N x V
// temporary is ever allocated. Arithmetic is fp32 whatever the input dtype; the row LSE is kept in float64 so that the
// backward's exp(x - lse) stays accurate when |logits| is large (an fp32 LSE of 1e4 is off by 5e-4).
// Only light headers are included (see DESIGN.md §5): this file compiles in seconds.
// RLHFV_SWEEPS_ONLY compiles the chunk sweeps alone, without ATen or torch (the part above RowLayout: c10's header-only
// bf16/half types are all it needs), for tests/build/sweeps_check.cpp, which runs them on aarch64 under an emulator.
#ifndef RLHFV_SWEEPS_ONLY
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef RLHFV_SWEEPS_ONLY
#include "../rlhfv_common.h"
#include "logprob_rows.h"
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

// Maximum of a chunk, ignoring NaN (a NaN still poisons the row through the exp sum; see forward_rows). Four
// accumulators: with one, each vector waited for the max before it (4 cycles), and this sweep of one max per vector
// took 11% of the bf16 forward+backward; with four the forward is 10% faster (fp32 and bf16, a Xeon with AVX-512).
// (Taking the max while widening a bf16 chunk into its fp32 copy, one sweep instead of two, was 5% slower there.)
template <int W>
RLHFV_INLINE float chunk_max_body(const float* x, int64_t n) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vfloat acc[4];
  for (auto& a : acc) a = Lanes<vfloat>::splat(neg_inf);
  const auto take = [&](vfloat& a, int64_t at) {
    const vfloat v = load_lanes<vfloat>(x + at);
    a = v > a ? v : a;
  };
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes)
    for (int k = 0; k < 4; ++k) take(acc[k], i + k * kLanes);
  for (; i + kLanes <= n; i += kLanes) take(acc[0], i);
  const vfloat pair0 = acc[1] > acc[0] ? acc[1] : acc[0], pair1 = acc[3] > acc[2] ? acc[3] : acc[2];
  float m = lanes_max(pair1 > pair0 ? pair1 : pair0);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
RLHFV_LEVELS(float, chunk_max, (const float* x, int64_t n), (x, n))

template <typename Acc>
bool chunk_has_nan(const Acc* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

// The next chunk of logits, fetched from memory while a sweep computes on this one from L1 (the forward's sum sweep;
// the backward's, on a bf16 row's fp32 copy). Without it the hardware prefetchers idle during such sweeps (they miss
// nothing), so compute and the next chunk's memory time add up instead of overlapping: the fp32 forward took 50-65 ms
// where it takes 47-52 with it, the bf16 in-place backward 72-75 where it takes 50-70 (AVX2, N = 4096, V = 32000,
// 2 threads, a noisy shared machine). `bytes` <= 0: nothing to fetch.
struct Ahead {
  const char* at = nullptr;
  int64_t bytes = 0;
};
// Fetches up to `lines` cache lines of `ahead` (one sum-sweep iteration's worth: 2W floats of fp32 logits).
RLHFV_INLINE void fetch_ahead(Ahead* ahead, int lines) {
  for (int k = 0; k < lines && ahead->bytes > 0; ++k) {
    __builtin_prefetch(ahead->at, 0, 3);
    ahead->at += 64;
    ahead->bytes -= 64;
  }
}
// 2W fp32 = 2 cache lines at W = 16, 1 at W = 8 (W = 4: 1, early); 2W bf16 = 1 line at W = 16 (W = 8: 1, early)
template <int W, typename T = float>
constexpr int kLinesPerStep = 2 * W * sizeof(T) >= 128 ? 2 : 1;

// A software-pipelined loop over the blocks [i, i + step) that fit in [0, n): begin(i) starts the work of a block
// (loads, the exp's reduction) and returns its state, finish(state, i) completes it; each iteration begins the next
// block before it finishes the one before, so the scheduler sees two blocks' independent chains (exp_reduce).
// Returns the first index not covered. The result is what begin-then-finish per block gives, bit for bit.
template <typename Begin, typename Finish>
RLHFV_INLINE int64_t pipelined_blocks(int64_t n, int64_t step, const Begin& begin, const Finish& finish) {
  if (n < step) return 0;
  auto state = begin(int64_t(0));
  int64_t i = step;
  for (; i + step <= n; i += step) {
    const auto next = begin(i);
    finish(state, i - step);
    state = next;
  }
  finish(state, i - step);
  return i;
}
// The same with three stages, for chains too long for two (the soft cap's gradient: an exp, a division, an exp):
// middle(state, i) -> the state finish takes.
template <typename Begin, typename Middle, typename Finish>
RLHFV_INLINE int64_t pipelined_blocks(int64_t n, int64_t step, const Begin& begin, const Middle& middle,
                                      const Finish& finish) {
  if (n < 2 * step) return 0;
  auto middled = middle(begin(int64_t(0)), int64_t(0));
  auto begun = begin(step);
  int64_t i = 2 * step;
  for (; i + step <= n; i += step) {
    const auto next = begin(i);
    const auto next_middled = middle(begun, i - step);
    finish(middled, i - 2 * step);
    begun = next;
    middled = next_middled;
  }
  finish(middled, i - 2 * step);
  finish(middle(begun, i - step), i - step);
  return i;
}

// sum_i exp(x_i / temp - shift). Two accumulators: the exp is one long dependency chain, and two independent ones per
// iteration keep the FMA ports busier (10-25% on AVX2). Pipelined in blocks of two vectors (pipelined_blocks).
template <int W, bool scaled>
RLHFV_INLINE float chunk_sum_exp_sweep(const float* x, int64_t n, float temp, float shift, Ahead ahead) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  const auto reduced_at = [&](int64_t i) {
    return exp_reduce(over_temp(load_lanes<vfloat>(x + i), temp, scaled) - shift);
  };
  vfloat acc = {}, acc2 = {};
  struct Pair {
    ExpReduced<vfloat> a, b;
  };
  int64_t i = pipelined_blocks(
      n, 2 * kLanes,
      [&](int64_t at) {
        fetch_ahead(&ahead, kLinesPerStep<W>);
        return Pair{reduced_at(at), reduced_at(at + kLanes)};
      },
      [&](const Pair& e, int64_t) {
        acc += exp_finish(e.a);
        acc2 += exp_finish(e.b);
      });
  for (; i + kLanes <= n; i += kLanes) acc += exp_finish(reduced_at(i));
  float s = lanes_sum(acc + acc2);
  for (; i < n; ++i) s += exp_nonpositive(over_temp(x[i], temp, scaled) - shift);
  return s;
}
// (the loop is instantiated per `scaled`: GCC left the temperature test inside it, a reload and two branches per
// vector, which also cost the registers that kept the accumulators and constants out of memory)
template <int W>
RLHFV_INLINE float chunk_sum_exp_body(const float* x, int64_t n, float temp, float shift, Ahead ahead) {
  return temp != 1.0f ? chunk_sum_exp_sweep<W, true>(x, n, temp, shift, ahead)
                      : chunk_sum_exp_sweep<W, false>(x, n, temp, shift, ahead);
}
RLHFV_LEVELS(float, chunk_sum_exp, (const float* x, int64_t n, float temp, float shift, Ahead ahead),
             (x, n, temp, shift, ahead))

// out_i = scale * exp(x_i / temp - lse_hi), the caller's scale carrying the LSE's low part: scale * exp(-lse_lo) once
// per row (backward_rows) instead of a vector subtraction per logit (the fp32 and bf16 softmax sweeps -4-8% at
// AVX-512, neutral at AVX2; interleaved A/B in L1) for one more rounding of a ~1e-7-accurate exp; `out` may alias `x`
// (a vector is loaded before it is stored, and the next one before that). Pipelined (pipelined_blocks). `coarse`: out
// is rounded to bf16 next (exp_finish_coarse). In and Out float, or both bf16 (the bf16 backward reads and writes the
// logits' own bytes: store_lanes rounds, natively where `native_bf16`).
template <int W, bool coarse, typename In = float, typename Out = float, bool native_bf16 = false>
RLHFV_INLINE void scaled_softmax_sweep(const In* x, Out* out, int64_t n, float temp, float lse_hi, float scale,
                                       Ahead ahead) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  const bool scaled = temp != 1.0f;
  const auto reduced_at = [&](int64_t i) {
    return exp_reduce(over_temp(load_lanes<vfloat>(x + i), temp, scaled) - lse_hi);
  };
  int64_t i = pipelined_blocks(
      n, kLanes,
      [&](int64_t at) {
        if (at % (2 * kLanes) == 0) fetch_ahead(&ahead, kLinesPerStep<W, In>);
        return reduced_at(at);
      },
      [&](const ExpReduced<vfloat>& e, int64_t at) {
        const vfloat v = scale * (coarse ? exp_finish_coarse(e) : exp_finish(e));
        if constexpr (std::is_same_v<Out, float>) {
          store_lanes(out + at, v);
        } else {
          store_lanes<vfloat, native_bf16>(out + at, v);
        }
      });
  for (; i < n; ++i) {
    const float z = over_temp(load_lanes<float>(x + i), temp, scaled);
    store_lanes(out + i, scale * exp_nonpositive(z - lse_hi));
  }
}
template <int W>
RLHFV_INLINE void chunk_scaled_softmax_body(const float* x, float* out, int64_t n, float temp, float lse_hi,
                                             float scale, Ahead ahead) {
  scaled_softmax_sweep<W, false>(x, out, n, temp, lse_hi, scale, ahead);
}
#define RLHFV_SOFTMAX_PARAMS \
  (const float* x, float* out, int64_t n, float temp, float lse_hi, float scale, Ahead ahead)
#define RLHFV_SOFTMAX_ARGS (x, out, n, temp, lse_hi, scale, ahead)
RLHFV_LEVELS(void, chunk_scaled_softmax, RLHFV_SOFTMAX_PARAMS, RLHFV_SOFTMAX_ARGS)
#undef RLHFV_SOFTMAX_ARGS
#undef RLHFV_SOFTMAX_PARAMS

// The soft cap (Gemma-style final_logit_softcapping): z = cap * tanh(x / cap), then / temp, and
// dz/dx = sech^2(x / cap) / temp. Both come from e = exp(-2|x| / cap): tanh(|x| / cap) = (1 - e) / (1 + e) and
// sech^2 = 4e / (1 + e)^2, which has no cancellation where tanh is near +-1. One vector division per value
// (1 / (1 + e)). The constants fold: -2 / cap, and z = (b - b e) / (1 + e) with b = cap / temp, one FMA and a product
// (x / cap, then 1 - e, * cap and / temp took two operations more and a second division under a temperature: the
// soft cap's sweeps are 5-6% faster at temp 1, 19-28% at temp 0.7, benchmarks/sweeps_bench.cpp in L1). +-inf logits
// become +-cap / temp, as in eager PyTorch; NaN stays NaN.
// |x| and z with x's sign (z >= 0 first) by their bits: `u < 0 ? -u : u` compiled to a compare, a xor and a blend,
// two of them on the FMA pipes that bound these loops; an and / xor runs on any of the four.
template <typename F>
RLHFV_INLINE F magnitude_of(F u) {
  typename Lanes<F>::Int bits;
  std::memcpy(&bits, &u, sizeof(bits));
  bits &= 0x7FFFFFFF;
  std::memcpy(&u, &bits, sizeof(u));
  return u;
}
// A non-negative `magnitude` with the sign of `signed_like` (xor: the magnitude's own sign bit is 0).
template <typename F>
RLHFV_INLINE F with_sign_of(F magnitude, F signed_like) {
  typename Lanes<F>::Int bits, sign;
  std::memcpy(&bits, &magnitude, sizeof(bits));
  std::memcpy(&sign, &signed_like, sizeof(sign));
  bits ^= sign & static_cast<int32_t>(0x80000000u);
  std::memcpy(&magnitude, &bits, sizeof(magnitude));
  return magnitude;
}
// In two halves like the exp (softcap_begin, then softcap_finish) for the pipelined loops.
template <typename F>
struct SoftcapBegun {
  F x;
  ExpReduced<F> e;  // of -2|x| / cap
};
template <typename F>
RLHFV_INLINE SoftcapBegun<F> softcap_begin(F x, float cap) {
  return {x, exp_reduce(magnitude_of(x) * Lanes<F>::splat(-2.0f / cap))};
}
template <typename F>
RLHFV_INLINE F softcap_finish(const SoftcapBegun<F>& begun, float cap, float temp, F* sech2) {
  using L = Lanes<F>;
  const F e = exp_finish(begun.e);
  const F one = L::splat(1.0f), inv = one / (one + e);
  *sech2 = L::splat(4.0f) * e * inv * inv;
  const F bound = L::splat(cap / temp);  // cap / 1 is cap exactly; unconditional, so GCC hoists it out of the loops
  return with_sign_of((bound - bound * e) * inv, begun.x);
}
template <typename F>
RLHFV_INLINE F softcapped(F x, float cap, float temp, F* sech2) {
  return softcap_finish(softcap_begin(x, cap), cap, temp, sech2);
}

// out_i = softcapped(x_i); `out` may alias `x`. Pipelined (pipelined_blocks).
template <int W>
RLHFV_INLINE void chunk_softcap_body(const float* x, float* out, int64_t n, float cap, float temp) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  int64_t i = pipelined_blocks(
      n, kLanes, [&](int64_t at) { return softcap_begin(load_lanes<vfloat>(x + at), cap); },
      [&](const SoftcapBegun<vfloat>& b, int64_t at) {
        vfloat unused;
        store_lanes(out + at, softcap_finish(b, cap, temp, &unused));
      });
  float unused_one;
  for (; i < n; ++i) out[i] = softcapped(x[i], cap, temp, &unused_one);
}
RLHFV_LEVELS(void, chunk_softcap, (const float* x, float* out, int64_t n, float cap, float temp),
             (x, out, n, cap, temp))

// out_i = scale * exp(z_i - lse_hi) * dz_i/dx_i, the softmax times the caller's scale, which carries the LSE's low
// part as in scaled_softmax_sweep; `out` may alias `x`.
// Pipelined (pipelined_blocks).
template <int W>
RLHFV_INLINE void chunk_softcap_grad_body(const float* x, float* out, int64_t n, float cap, float temp, float lse_hi,
                                           float scale, Ahead ahead) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  struct Middled {
    ExpReduced<vfloat> e;
    vfloat sech2;
  };
  int64_t i = pipelined_blocks(
      n, kLanes,
      [&](int64_t at) {
        if (at % (2 * kLanes) == 0) fetch_ahead(&ahead, kLinesPerStep<W>);
        return softcap_begin(load_lanes<vfloat>(x + at), cap);
      },
      [&](const SoftcapBegun<vfloat>& b, int64_t) {
        Middled m;
        const vfloat z = softcap_finish(b, cap, temp, &m.sech2);
        m.e = exp_reduce(z - lse_hi);
        return m;
      },
      [&](const Middled& m, int64_t at) { store_lanes(out + at, scale * exp_finish(m.e) * m.sech2); });
  for (; i < n; ++i) {
    float sech2;
    const float z = softcapped(x[i], cap, temp, &sech2);
    out[i] = scale * exp_nonpositive(z - lse_hi) * sech2;
  }
}
RLHFV_LEVELS(void, chunk_softcap_grad,
             (const float* x, float* out, int64_t n, float cap, float temp, float lse_hi, float scale, Ahead ahead),
             (x, out, n, cap, temp, lse_hi, scale, ahead))

// The entropy's running sums: s1 += sum_i exp(t_i), s2 += sum_i exp(t_i) * t_i with t_i = x_i / temp - shift <= 0.
// t is clamped at -87 like the exp's argument: a masked (-inf) logit then adds ~1e-36 to s2, not 1e-38 * -inf = -inf
// (one max instruction per vector; NaN still propagates).
template <typename F>
RLHFV_INLINE F moment_exponent(F x, float temp, bool scaled, float shift) {
  return clamp_below(over_temp(x, temp, scaled) - shift, -87.0f);
}
template <typename F>
RLHFV_INLINE void add_exp_and_moment(F t, F e, F* sum, F* moment) {  // e = exp(t)
  *sum += e;
  *moment += e * t;
}
template <int W>
RLHFV_INLINE void chunk_sum_exp_and_moment_body(const float* x, int64_t n, float temp, float shift, Ahead ahead,
                                                float* s1, float* s2) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  const bool scaled = temp != 1.0f;
  vfloat sum = {}, moment = {}, sum2 = {}, moment2 = {};  // two of each, as in chunk_sum_exp, pipelined as it is
  struct Begun {
    vfloat t, t2;
    ExpReduced<vfloat> e, e2;
  };
  const auto exponent_at = [&](int64_t at) { return moment_exponent(load_lanes<vfloat>(x + at), temp, scaled, shift); };
  int64_t i = pipelined_blocks(
      n, 2 * kLanes,
      [&](int64_t at) {
        fetch_ahead(&ahead, kLinesPerStep<W>);
        Begun b;
        b.t = exponent_at(at);
        b.t2 = exponent_at(at + kLanes);
        b.e = exp_reduce(b.t);
        b.e2 = exp_reduce(b.t2);
        return b;
      },
      [&](const Begun& b, int64_t) {
        add_exp_and_moment(b.t, exp_finish(b.e), &sum, &moment);
        add_exp_and_moment(b.t2, exp_finish(b.e2), &sum2, &moment2);
      });
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat t = exponent_at(i);
    add_exp_and_moment(t, exp_nonpositive(t), &sum, &moment);
  }
  float a = lanes_sum(sum + sum2), b = lanes_sum(moment + moment2);
  for (; i < n; ++i) {
    const float t = moment_exponent(x[i], temp, scaled, shift);
    add_exp_and_moment(t, exp_nonpositive(t), &a, &b);
  }
  *s1 += a;
  *s2 += b;
}
RLHFV_LEVELS(void, chunk_sum_exp_and_moment,
             (const float* x, int64_t n, float temp, float shift, Ahead ahead, float* s1, float* s2),
             (x, n, temp, shift, ahead, s1, s2))

// The entropy-carrying gradient: out_i = slope_i * p_i * (a + b * log p_i), log p_i = (z_i - lse_hi) - lse_lo,
// slope_i = dz_i/dx_i * temp (sech^2(x_i / cap) under a cap, else 1; z already divided by temp). With the caller's
// a = -(g + g_H * H) / temp and b = -g_H / temp this is d(g * logp + g_H * H)/dx off the label (DESIGN.md §2).
// log p is clamped at -87 (masked logits: ~1e-36, not 0 * -inf). `out` may alias `x`. Pipelined (pipelined_blocks).
template <int W, bool Capped>
RLHFV_INLINE void entropy_grad_body(const float* x, float* out, int64_t n, float cap, float temp, float lse_hi,
                                    float lse_lo, float a, float b, Ahead ahead) {
  using vfloat = typename Vec<W>::F;
  constexpr int kLanes = W;
  const bool scaled = temp != 1.0f;
  struct Begun {
    vfloat slope, d;
    ExpReduced<vfloat> e;
  };
  int64_t i = pipelined_blocks(
      n, kLanes,
      [&](int64_t at) {
        if (at % (2 * kLanes) == 0) fetch_ahead(&ahead, kLinesPerStep<W>);
        Begun g;
        g.slope = Lanes<vfloat>::splat(1.0f);
        vfloat z = load_lanes<vfloat>(x + at);
        if (Capped) {
          z = softcapped(z, cap, temp, &g.slope);
        } else {
          z = over_temp(z, temp, scaled);
        }
        g.d = clamp_below((z - lse_hi) - lse_lo, -87.0f);
        g.e = exp_reduce(g.d);
        return g;
      },
      [&](const Begun& g, int64_t at) { store_lanes(out + at, g.slope * exp_finish(g.e) * (a + b * g.d)); });
  for (; i < n; ++i) {
    float slope = 1.0f, z = x[i];
    if (Capped) {
      z = softcapped(z, cap, temp, &slope);
    } else {
      z = over_temp(z, temp, scaled);
    }
    const float d = clamp_below((z - lse_hi) - lse_lo, -87.0f);
    out[i] = slope * exp_nonpositive(d) * (a + b * d);
  }
}
template <int W>
RLHFV_INLINE void chunk_entropy_grad_body(const float* x, float* out, int64_t n, float cap, float temp, float lse_hi,
                                          float lse_lo, float a, float b, Ahead ahead) {
  entropy_grad_body<W, false>(x, out, n, cap, temp, lse_hi, lse_lo, a, b, ahead);
}
template <int W>
RLHFV_INLINE void chunk_softcap_entropy_grad_body(const float* x, float* out, int64_t n, float cap, float temp,
                                                  float lse_hi, float lse_lo, float a, float b, Ahead ahead) {
  entropy_grad_body<W, true>(x, out, n, cap, temp, lse_hi, lse_lo, a, b, ahead);
}
#define RLHFV_GRAD_PARAMS \
  (const float* x, float* out, int64_t n, float cap, float temp, float lse_hi, float lse_lo, float a, float b, \
   Ahead ahead)
#define RLHFV_GRAD_ARGS (x, out, n, cap, temp, lse_hi, lse_lo, a, b, ahead)
RLHFV_LEVELS(void, chunk_entropy_grad, RLHFV_GRAD_PARAMS, RLHFV_GRAD_ARGS)
RLHFV_LEVELS(void, chunk_softcap_entropy_grad, RLHFV_GRAD_PARAMS, RLHFV_GRAD_ARGS)
#undef RLHFV_GRAD_ARGS
#undef RLHFV_GRAD_PARAMS

// float64 logits (used by gradcheck and as a precise CPU path): plain libm, no speed ambitions.
double chunk_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
double chunk_sum_exp(const double* x, int64_t n, double temp, double shift, Ahead /*unused*/) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] / temp - shift);
  return s;
}
void chunk_scaled_softmax(const double* x, double* out, int64_t n, double temp, double lse_hi, double scale,
                          Ahead /*unused*/) {
  for (int64_t i = 0; i < n; ++i) out[i] = scale * std::exp(x[i] / temp - lse_hi);
}
double softcapped(double x, double cap, double temp, double* sech2) {
  const double th = std::tanh(x / cap);
  *sech2 = 1.0 - th * th;
  return th * cap / temp;
}
void chunk_softcap(const double* x, double* out, int64_t n, double cap, double temp) {
  double unused;
  for (int64_t i = 0; i < n; ++i) out[i] = softcapped(x[i], cap, temp, &unused);
}
void chunk_softcap_grad(const double* x, double* out, int64_t n, double cap, double temp, double lse_hi, double scale,
                        Ahead /*unused*/) {
  for (int64_t i = 0; i < n; ++i) {
    double sech2;
    const double z = softcapped(x[i], cap, temp, &sech2);
    out[i] = scale * std::exp(z - lse_hi) * sech2;
  }
}
void chunk_sum_exp_and_moment(const double* x, int64_t n, double temp, double shift, Ahead /*unused*/, double* s1,
                              double* s2) {
  for (int64_t i = 0; i < n; ++i) {
    const double t = x[i] / temp - shift;
    const double e = std::exp(t);
    *s1 += e;
    if (e > 0) *s2 += e * t;  // exp(-inf) * -inf would be NaN
  }
}
void entropy_grad_double(const double* x, double* out, int64_t n, double cap, double temp, double lse_hi,
                         double lse_lo, double a, double b, bool capped) {
  for (int64_t i = 0; i < n; ++i) {
    double slope = 1.0, z = x[i] / temp;
    if (capped) z = softcapped(x[i], cap, temp, &slope);
    const double d = (z - lse_hi) - lse_lo;
    const double p = std::exp(d);
    out[i] = p > 0 ? slope * p * (a + b * d) : 0.0;
  }
}
void chunk_entropy_grad(const double* x, double* out, int64_t n, double cap, double temp, double lse_hi,
                        double lse_lo, double a, double b, Ahead /*unused*/) {
  entropy_grad_double(x, out, n, cap, temp, lse_hi, lse_lo, a, b, false);
}
void chunk_softcap_entropy_grad(const double* x, double* out, int64_t n, double cap, double temp, double lse_hi,
                                double lse_lo, double a, double b, Ahead /*unused*/) {
  entropy_grad_double(x, out, n, cap, temp, lse_hi, lse_lo, a, b, true);
}
inline float exp_nonpositive_any(float x) { return exp_nonpositive<float>(x); }
inline double exp_nonpositive_any(double x) { return std::exp(x); }

// Accumulation type: fp32 for every input dtype but float64, which keeps its precision.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Conversions between the input dtype and the fp32 chunk buffer, written as bit operations so they vectorize
// (c10's scalar conversions do not). Rounding matches c10: round-to-nearest-even, NaN stays NaN (on kV4Bf16 a NaN
// keeps its payload and fp32 subnormals become 0: store_lanes). The widening is a plain loop: GCC vectorizes it
// better (0.028 ns per logit at v4) than it compiles load_lanes' __builtin_convertvector in a loop (0.077: it splits
// each 16-lane widening in two halves and reinserts them).
RLHFV_MULTIVERSION void load_chunk(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t widened = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &widened, sizeof(float));
  }
}

template <int W, bool native>
RLHFV_INLINE void store_chunk_body(const float* src, c10::BFloat16* dst, int64_t n) {
  using vfloat = typename Vec<W>::F;
  int64_t i = 0;
  for (; i + W <= n; i += W) store_lanes<vfloat, native>(dst + i, load_lanes<vfloat>(src + i));
  for (; i < n; ++i) store_lanes(dst + i, src[i]);
}
RLHFV_BF16_LEVELS(void, store_chunk, (const float* src, c10::BFloat16* dst, int64_t n), (src, dst, n))

// scaled_softmax from bf16 logits to their bf16 gradient, with the coarse exp (out may alias x). With 32 vector
// registers (AVX-512) in one sweep over the logits' own bytes; with 16 (AVX2, SSE, NEON) that loop spills, so there
// the chunk is widened into `scratch` (n floats, in L1), swept there, and rounded back (AVX2 on the Xeon: 0.43-0.45
// ns per logit against 0.51-0.59 for the one sweep, benchmarks/sweeps.py).
template <int W, bool native>
RLHFV_INLINE void chunk_scaled_softmax_bf16_body(const c10::BFloat16* x, c10::BFloat16* out, float* scratch, int64_t n,
                                                  float temp, float lse_hi, float scale, Ahead ahead) {
  if constexpr (W >= 16) {
    scaled_softmax_sweep<W, true, c10::BFloat16, c10::BFloat16, native>(x, out, n, temp, lse_hi, scale, ahead);
  } else {
    load_chunk(x, scratch, n);
    scaled_softmax_sweep<W, true>(scratch, scratch, n, temp, lse_hi, scale, ahead);
    store_chunk_body<W, native>(scratch, out, n);
  }
}
RLHFV_BF16_LEVELS(void, chunk_scaled_softmax_bf16,
                  (const c10::BFloat16* x, c10::BFloat16* out, float* scratch, int64_t n, float temp, float lse_hi,
                   float scale, Ahead ahead),
                  (x, out, scratch, n, temp, lse_hi, scale, ahead))

// IEEE half: the compiler does not vectorize half conversions by itself, so on x86 use F16C when the CPU has it.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx,f16c"))) void load_half_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) void store_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

const bool kHasF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#else
constexpr bool kHasF16C = false;
void load_half_f16c(const uint16_t*, float*, int64_t) {}
void store_half_f16c(const float*, uint16_t*, int64_t) {}
#endif

void load_chunk(const c10::Half* src, float* dst, int64_t n) {
  if (kHasF16C) return load_half_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void store_chunk(const float* src, c10::Half* dst, int64_t n) {
  if (kHasF16C) return store_half_f16c(src, reinterpret_cast<uint16_t*>(dst), n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

#ifdef RLHFV_SWEEPS_ONLY
}  // namespace
}  // namespace rlhfv
#else
// Offsets of rows of a [..., V] tensor with arbitrary leading strides (e.g. logits[:, :-1]).
struct RowLayout {
  std::vector<int64_t> sizes, strides;
  explicit RowLayout(const at::Tensor& t) {
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
      sizes.push_back(t.size(d));
      strides.push_back(t.stride(d));
    }
  }
  int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      off += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return off;
  }
};

// Rows per parallel task: enough that a task streams at least ~64K logits.
inline int64_t grain_for(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

inline void check_label(int64_t label, int64_t vocab, int64_t ignore_index, int64_t row) {
  TORCH_CHECK_INDEX(label >= 0 && label < vocab, "rlhfv: labels[", row, "] = ", label, " is out of range [0, ", vocab,
                    ") and is not ignore_index (", ignore_index, ")");
}

// The fp32 (fp64) view of a chunk: the input itself when it already has the accumulation type, else a converted copy.
template <typename T>
inline const acc_t<T>* chunk_as_acc(const T* src, acc_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    load_chunk(src, buf, n);
    return buf;
  }
}

// Runs body(r, row, next_row, buf) for every row of logits in parallel; next_row is the row this thread does next
// (nullptr after its last); `buf` is per-thread scratch of kChunk values (unused, and empty, when the input already
// has the accumulation type and no soft cap is applied).
template <typename T, typename Body>
void parallel_rows(const at::Tensor& logits, bool capped, const Body& body) {
  const int64_t vocab = logits.size(-1);
  const RowLayout layout(logits);
  const T* base = logits.const_data_ptr<T>();
  at::parallel_for(0, logp_rows(logits), grain_for(vocab), [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> buf(std::is_same_v<T, acc_t<T>> && !capped ? 0 : kChunk);
    const T* row = base + layout.offset(begin);
    for (int64_t r = begin; r < end; ++r) {
      const T* next_row = r + 1 < end ? base + layout.offset(r + 1) : nullptr;
      body(r, row, next_row, buf.data());
      row = next_row;
    }
  });
}

// What to fetch while the chunk of `row` at `off` is swept: its next chunk, else the first of `next_row` (nullptr:
// none, or a row that will not be read).
template <typename T>
Ahead next_chunk(const T* row, const T* next_row, int64_t off, int64_t vocab) {
  if (off + kChunk < vocab)
    return Ahead{reinterpret_cast<const char*>(row + off + kChunk),
                 std::min(kChunk, vocab - off - kChunk) * int64_t(sizeof(T))};
  if (next_row == nullptr) return Ahead{};
  return Ahead{reinterpret_cast<const char*>(next_row), std::min(kChunk, vocab) * int64_t(sizeof(T))};
}

// z = x / temp, or softcapped(x) when softcap > 0 (then each chunk is transformed into `buf` first and the sweeps
// below run on z with temperature 1; the transform is increasing, so z's maximum is still the running shift).
// With `entropy` (else nullptr) each row also keeps s2 = sum exp(z - max) * (z - max) beside s1 = sum exp(z - max),
// so H = -sum p log p = log s1 - s2 / s1: two non-negative terms, no cancellation of large logits.
template <typename T>
void forward_rows(const at::Tensor& logits, const int64_t* labels, acc_t<T>* logp, double* lse, acc_t<T>* entropy,
                  int64_t ignore_index, double temperature, double softcap) {
  using Acc = acc_t<T>;
  const Acc temp = static_cast<Acc>(temperature);
  const Acc cap = static_cast<Acc>(softcap);
  const bool capped = softcap > 0.0;
  const Acc sweep_temp = capped ? Acc(1) : temp;
  const int64_t vocab = logits.size(-1);
  parallel_rows<T>(logits, capped, [&](int64_t r, const T* row, const T* next_row, Acc* buf) {
    const int64_t label = labels[r];
    if (label == ignore_index) {
      logp[r] = 0;
      lse[r] = 0.0;
      if (entropy) entropy[r] = 0;
      return;
    }
    check_label(label, vocab, ignore_index, r);
    const T* next_read = next_row != nullptr && labels[r + 1] != ignore_index ? next_row : nullptr;
    Acc running_max = -std::numeric_limits<Acc>::infinity();
    Acc running_sum = 0, running_moment = 0;
    for (int64_t off = 0; off < vocab; off += kChunk) {
      const int64_t n = std::min(kChunk, vocab - off);
      const Acc* xs = chunk_as_acc(row + off, buf, n);
      if (capped) {
        chunk_softcap(xs, buf, n, cap, temp);
        xs = buf;
      }
      const Acc chunk_peak = chunk_max(xs, n) / sweep_temp;
      if (chunk_peak > running_max) {
        const Acc shift = running_max - chunk_peak;  // < 0; -inf on the first finite chunk
        const Acc rescale = std::exp(shift);
        // sum e^(z - new) (z - new) = e^shift * (s2 + shift * s1); nothing to carry while s1 is still 0.
        if (entropy && running_sum != 0) running_moment = rescale * (running_moment + shift * running_sum);
        running_sum *= rescale;
        running_max = chunk_peak;
      }
      if (running_max == -std::numeric_limits<Acc>::infinity()) {
        // Only -inf so far (masked vocabulary entries): they add exp(-inf) = 0, and shifting by -inf would give
        // NaN. The max ignores NaN, so look for one here (rare path) to keep "NaN in a row -> NaN".
        if (chunk_has_nan(xs, n)) running_sum = std::numeric_limits<Acc>::quiet_NaN();
        continue;
      }
      // A NaN elsewhere reaches the sum through exp(NaN - max) = NaN.
      const Ahead ahead = next_chunk(row, next_read, off, vocab);
      if (entropy) {
        chunk_sum_exp_and_moment(xs, n, sweep_temp, running_max, ahead, &running_sum, &running_moment);
      } else {
        running_sum += chunk_sum_exp(xs, n, sweep_temp, running_max, ahead);
      }
    }
    // (z_target - lse) in float64: both terms can be ~1e4 while their difference is small.
    const double row_lse = static_cast<double>(running_max) + std::log(static_cast<double>(running_sum));
    lse[r] = row_lse;
    Acc target;
    if (capped) {
      Acc unused;
      target = softcapped(static_cast<Acc>(row[label]), cap, temp, &unused);
    } else {
      target = static_cast<Acc>(row[label]) / temp;
    }
    logp[r] = static_cast<Acc>(static_cast<double>(target) - row_lse);
    if (entropy) {
      const double s1 = static_cast<double>(running_sum);
      entropy[r] = static_cast<Acc>(std::log(s1) - static_cast<double>(running_moment) / s1);
    }
  });
}

// Writes grad_logp[r] * (onehot - softmax) / temp for every row into `out_base` laid out as `out_layout`
// (which is the logits' own layout when the gradient overwrites them).
// With a soft cap every entry also carries dz/dx = sech^2(x / cap) / temp.
// With grad_entropy (else nullptr; then `entropy` is unused) the rows carry d(g_H * H)/dx as well:
// dH/dz_j = -p_j (log p_j + H), so each entry is slope * p * (a + b * log p) (chunk_entropy_grad).
template <typename T>
void backward_rows(const at::Tensor& logits, const int64_t* labels, const acc_t<T>* grad_logp, const double* lse,
                   const acc_t<T>* grad_entropy, const acc_t<T>* entropy, T* out_base, const RowLayout& out_layout,
                   int64_t ignore_index, double temperature, double softcap) {
  using Acc = acc_t<T>;
  const Acc temp = static_cast<Acc>(temperature);
  const Acc cap = static_cast<Acc>(softcap);
  const bool capped = softcap > 0.0;
  const int64_t vocab = logits.size(-1);
  const auto gets_gradient = [&](int64_t r) {
    return labels[r] != ignore_index && (grad_logp[r] != 0 || (grad_entropy != nullptr && grad_entropy[r] != 0));
  };
  parallel_rows<T>(logits, capped, [&](int64_t r, const T* row, const T* next_row, Acc* buf) {
    T* out = out_base + out_layout.offset(r);
    const int64_t label = labels[r];
    const Acc coef = grad_logp[r];
    const Acc coef_h = grad_entropy ? grad_entropy[r] : Acc(0);
    if (!gets_gradient(r)) {
      std::fill(out, out + vocab, T(0));  // no need to read the logits of a row that gets no gradient
      return;
    }
    check_label(label, vocab, ignore_index, r);
    const Acc lse_hi = static_cast<Acc>(lse[r]);
    const Acc lse_lo = static_cast<Acc>(lse[r] - static_cast<double>(lse_hi));
    // Read the target logit before the sweep: in place, the sweep overwrites it.
    Acc target_z, target_slope = Acc(1);
    if (capped) {
      target_z = softcapped(static_cast<Acc>(row[label]), cap, temp, &target_slope);
    } else {
      target_z = static_cast<Acc>(row[label]) / temp;
    }
    const Acc target_logp = (target_z - lse_hi) - lse_lo;
    const Acc target_prob = exp_nonpositive_any(target_logp);
    // -coef / temp times exp(-lse_lo): the softmax sweeps then exponentiate x / temp - lse_hi alone (one vector
    // subtraction fewer per logit; scaled_softmax_sweep)
    const Acc softmax_scale = -coef / temp * std::exp(-lse_lo);
    const Acc row_entropy = coef_h != 0 ? entropy[r] : Acc(0);
    const Acc a = -(coef + coef_h * row_entropy) / temp, b = -coef_h / temp;
    const T* next_read = next_row != nullptr && gets_gradient(r + 1) ? next_row : nullptr;
    // One chunk [from, from + n) of `src` (the row, or its fp32 copy) into `dst`, fetching `ahead` meanwhile.
    const auto sweep = [&](const Acc* src, Acc* dst, int64_t n, Ahead ahead) {
      if (coef_h != 0) {
        if (capped) {
          chunk_softcap_entropy_grad(src, dst, n, cap, temp, lse_hi, lse_lo, a, b, ahead);
        } else {
          chunk_entropy_grad(src, dst, n, cap, temp, lse_hi, lse_lo, a, b, ahead);
        }
      } else if (capped) {
        chunk_softcap_grad(src, dst, n, cap, temp, lse_hi, softmax_scale, ahead);
      } else {
        chunk_scaled_softmax(src, dst, n, temp, lse_hi, softmax_scale, ahead);
      }
    };
    for (int64_t off = 0; off < vocab; off += kChunk) {
      const int64_t n = std::min(kChunk, vocab - off);
      const Ahead ahead = next_chunk(row, next_read, off, vocab);
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (coef_h == 0 && !capped) {  // the plain gradient: one sweep over the bytes at AVX-512, through buf below
          chunk_scaled_softmax_bf16(row + off, out + off, buf, n, temp, lse_hi, softmax_scale, ahead);
          continue;
        }
      }
      if constexpr (std::is_same_v<T, Acc>) {
        sweep(row + off, out + off, n, ahead);
      } else {
        sweep(chunk_as_acc(row + off, buf, n), buf, n, ahead);
        store_chunk(buf, out + off, n);
      }
    }
    // At the label, c/t * (1 - p) rather than c/t - c/t * p: the difference of two near-equal terms loses bits.
    Acc at_label = coef / temp * (Acc(1) - target_prob);
    if (coef_h != 0) at_label += target_prob * b * (target_logp + row_entropy);
    out[label] = static_cast<T>(at_label * target_slope);
  });
}

void check_common(const at::Tensor& logits, const at::Tensor& labels, double temperature, double softcap) {
  TORCH_CHECK(logits.device().is_cpu(), "rlhfv: logits must be a CPU tensor for the CPU kernel");
  check_logprob_inputs(logits, labels, temperature, softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index, double temperature, double softcap,
                                                           bool with_entropy) {
  check_common(logits, labels, temperature, softcap);
  const at::Tensor flat_labels = labels.to(at::kLong).contiguous();
  const auto logp_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logp = at::empty(labels.sizes(), logits.options().dtype(logp_dtype));
  at::Tensor lse = at::empty(labels.sizes(), logits.options().dtype(at::kDouble));
  at::Tensor entropy = at::empty(with_entropy ? labels.sizes() : at::IntArrayRef{0}, logp.options());
  cpu::logprob_rows_forward(logits, flat_labels, logp, lse, with_entropy ? &entropy : nullptr, ignore_index,
                            temperature, softcap);
  return {logp, lse, entropy};
}

std::tuple<at::Tensor, at::Tensor> logprob_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                   int64_t ignore_index, double temperature, double softcap,
                                                   bool /*inplace_backward*/) {
  auto [logp, lse, unused] = forward_cpu(logits, labels, ignore_index, temperature, softcap, false);
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_entropy_fwd_cpu(const at::Tensor& logits,
                                                                       const at::Tensor& labels, int64_t ignore_index,
                                                                       double temperature, double softcap,
                                                                       bool /*inplace_backward*/) {
  auto [logp, lse, entropy] = forward_cpu(logits, labels, ignore_index, temperature, softcap, true);
  return {logp, entropy, lse};
}

struct BackwardInputs {
  at::Tensor labels, grad, lse, grad_entropy, entropy;  // the last two undefined without an entropy gradient
};

BackwardInputs prepare_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, double temperature, double softcap,
                                const at::Tensor* grad_entropy = nullptr, const at::Tensor* entropy = nullptr) {
  check_common(logits, labels, temperature, softcap);
  TORCH_CHECK(grad_logp.sizes() == labels.sizes(), "rlhfv: grad_logp shape ", grad_logp.sizes(),
              " must equal labels shape ", labels.sizes());
  TORCH_CHECK(lse.sizes() == labels.sizes() && lse.scalar_type() == at::kDouble,
              "rlhfv: lse must be the float64 tensor returned by logprob_fwd");
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  BackwardInputs in{labels.to(at::kLong).contiguous(), grad_logp.to(acc_dtype).contiguous(), lse.contiguous(), {}, {}};
  if (grad_entropy != nullptr) {
    TORCH_CHECK(grad_entropy->sizes() == labels.sizes() && entropy->sizes() == labels.sizes(),
                "rlhfv: grad_entropy and entropy must have labels' shape ", labels.sizes());
    in.grad_entropy = grad_entropy->to(acc_dtype).contiguous();
    in.entropy = entropy->to(acc_dtype).contiguous();
  }
  return in;
}

void rows_backward(const at::Tensor& logits, const BackwardInputs& in, at::Tensor& out, int64_t ignore_index,
                   double temperature, double softcap) {
  const bool with_entropy = in.grad_entropy.defined();
  cpu::logprob_rows_backward(logits, in.labels, in.grad, in.lse, out, ignore_index, temperature, softcap,
                             with_entropy ? &in.grad_entropy : nullptr, with_entropy ? &in.entropy : nullptr);
}

// A fresh N x V gradient buffer is first touched by the backward sweep; with 4 KiB pages that costs one page fault
// per 4 KiB and, on the machines we measured, more time than the sweep itself. Asking for transparent huge pages
// (best effort, Linux only, no effect where THP is disabled) cuts the faults 512-fold.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (bytes < 8 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

at::Tensor new_gradient_buffer(const at::Tensor& logits) {
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());  // contiguous
  advise_huge_pages(dlogits.data_ptr(), dlogits.nbytes());
  return dlogits;
}

at::Tensor logprob_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap) {
  const BackwardInputs in = prepare_backward(grad_logp, logits, labels, lse, temperature, softcap);
  at::Tensor dlogits = new_gradient_buffer(logits);
  rows_backward(logits, in, dlogits, ignore_index, temperature, softcap);
  return dlogits;
}

void logprob_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& grad_logp, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap) {
  const BackwardInputs in = prepare_backward(grad_logp, logits, labels, lse, temperature, softcap);
  rows_backward(logits, in, logits, ignore_index, temperature, softcap);
}

at::Tensor logprob_entropy_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                   const at::Tensor& entropy, int64_t ignore_index, double temperature,
                                   double softcap) {
  const BackwardInputs in =
      prepare_backward(grad_logp, logits, labels, lse, temperature, softcap, &grad_entropy, &entropy);
  at::Tensor dlogits = new_gradient_buffer(logits);
  rows_backward(logits, in, dlogits, ignore_index, temperature, softcap);
  return dlogits;
}

void logprob_entropy_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                     int64_t ignore_index, double temperature, double softcap) {
  const BackwardInputs in =
      prepare_backward(grad_logp, logits, labels, lse, temperature, softcap, &grad_entropy, &entropy);
  rows_backward(logits, in, logits, ignore_index, temperature, softcap);
}

}  // namespace

namespace cpu {

void logprob_rows_forward(const at::Tensor& logits, const at::Tensor& labels, at::Tensor& logp, at::Tensor& lse,
                          at::Tensor* entropy, int64_t ignore_index, double temperature, double softcap) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhfv_logprob_fwd", [&] {
    using Acc = acc_t<scalar_t>;
    forward_rows<scalar_t>(logits, labels.const_data_ptr<int64_t>(), logp.mutable_data_ptr<Acc>(),
                           lse.mutable_data_ptr<double>(), entropy ? entropy->mutable_data_ptr<Acc>() : nullptr,
                           ignore_index, temperature, softcap);
  });
}

void logprob_rows_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& grad,
                           const at::Tensor& lse, at::Tensor& out, int64_t ignore_index, double temperature,
                           double softcap, const at::Tensor* grad_entropy, const at::Tensor* entropy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhfv_logprob_bwd", [&] {
    using Acc = acc_t<scalar_t>;
    backward_rows<scalar_t>(logits, labels.const_data_ptr<int64_t>(), grad.const_data_ptr<Acc>(),
                            lse.const_data_ptr<double>(), grad_entropy ? grad_entropy->const_data_ptr<Acc>() : nullptr,
                            entropy ? entropy->const_data_ptr<Acc>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                            RowLayout(out), ignore_index, temperature, softcap);
  });
}

}  // namespace cpu
}  // namespace rlhfv
#endif  // RLHFV_SWEEPS_ONLY

// Which level's kernels this CPU runs (RLHFV_LEVELS), so that benchmarks can say which code they timed
// (rlhfv_kernels.cpu_kernel_variant()).
extern "C" const char* rlhfv_cpu_variant() {
#if RLHFV_X86_LEVELS
  switch (rlhfv::cpu_level()) {
    case rlhfv::CpuLevel::kV4Bf16: return "x86-64-v4 (AVX-512) + AVX512-BF16";
    case rlhfv::CpuLevel::kV4: return "x86-64-v4 (AVX-512)";
    case rlhfv::CpuLevel::kV3: return "x86-64-v3 (AVX2, FMA)";
    default: return "x86-64 baseline (SSE2)";
  }
#elif defined(__aarch64__)
  return "aarch64 (NEON)";
#else
  return "one build for this target (no per-level variants)";
#endif
}

#ifndef RLHFV_SWEEPS_ONLY
TORCH_LIBRARY_IMPL(rlhfv, CPU, m) {
  m.impl("logprob_fwd", &rlhfv::logprob_fwd_cpu);
  m.impl("logprob_bwd", &rlhfv::logprob_bwd_cpu);
  m.impl("logprob_bwd_", &rlhfv::logprob_bwd_inplace_cpu);
  m.impl("logprob_entropy_fwd", &rlhfv::logprob_entropy_fwd_cpu);
  m.impl("logprob_entropy_bwd", &rlhfv::logprob_entropy_bwd_cpu);
  m.impl("logprob_entropy_bwd_", &rlhfv::logprob_entropy_bwd_inplace_cpu);
}
#endif  // RLHFV_SWEEPS_ONLY
