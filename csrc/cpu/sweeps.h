// The CPU kernels' chunk sweeps: each runs over one L1-resident chunk of a row of logits (kChunk floats) and is
// compiled per x86-64 level (simd.h). logprob_cpu.cpp's row drivers chain them over whole rows. Torch-free, like
// simd.h; internal linkage: one translation unit includes it per binary.
#pragma once
#include "simd.h"

namespace rlhfv {
namespace {


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

}  // namespace
}  // namespace rlhfv
