// The CPU kernels' chunk sweeps (csrc/cpu/sweeps.h: no ATen, no torch) against
// float64 on one target, for targets whose torch this machine cannot run: test_cpu_cross_compile.py builds it for
// aarch64 (NEON: the generic 8-wide body) and runs it under qemu. Odd lengths reach every vector loop's scalar tail;
// temperatures 1 and 0.7 take both instantiations of each sweep. Prints one line per check; exits 1 if any fails.
#include "../../csrc/cpu/sweeps.h"

#include <cstdio>
#include <random>

namespace {

int failures = 0;

void report(const char* what, int64_t n, float temp, double err, double tol) {
  const bool ok = err <= tol;  // NaN fails
  if (!ok) ++failures;
  std::printf("%-4s %-28s n=%-5lld t=%.1f  error %.3g (allowed %.3g)\n", ok ? "ok" : "FAIL", what,
              static_cast<long long>(n), temp, err, tol);
}

double rel(double ours, double truth) { return std::fabs(ours - truth) / std::fmax(std::fabs(truth), 1e-300); }

// A row of logits like a model's: normal with scale 3, and a few far below the rest (masked-like, -1e4).
std::vector<float> random_row(std::mt19937& gen, int64_t n) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = normal(gen);
  for (int64_t i = 5; i < n; i += 97) x[i] = -1e4f;
  return x;
}

void check_row(std::mt19937& gen, int64_t n, float temp) {
  using rlhfv::Ahead;
  const std::vector<float> x = random_row(gen, n);
  std::vector<float> out(n);
  double max_truth = -INFINITY;
  for (float v : x) max_truth = std::fmax(max_truth, v);
  report("chunk_max", n, temp, std::fabs(rlhfv::chunk_max(x.data(), n) - max_truth), 0.0);

  // log-sum-exp of x / temp, shifted by the max as the forward does
  const float shift = static_cast<float>(max_truth / temp);
  double sum_truth = 0.0, moment_truth = 0.0;
  for (float v : x) {
    const double t = static_cast<double>(v) / temp - shift, e = std::exp(t);
    sum_truth += e;
    if (e > 0) moment_truth += e * t;
  }
  report("chunk_sum_exp", n, temp, rel(rlhfv::chunk_sum_exp(x.data(), n, temp, shift, Ahead{}), sum_truth), 1e-6);
  float s1 = 0.0f, s2 = 0.0f;
  rlhfv::chunk_sum_exp_and_moment(x.data(), n, temp, shift, Ahead{}, &s1, &s2);
  report("chunk_sum_exp_and_moment s1", n, temp, rel(s1, sum_truth), 1e-6);
  report("chunk_sum_exp_and_moment s2", n, temp, std::fabs(s2 - moment_truth) / std::fmax(sum_truth, 1.0), 1e-6);

  // softmax * scale, as the backward writes it: fp32, and bf16 logits to their bf16 gradient (the coarse exp, then
  // rounded: bf16 keeps 8 significant bits, so 2^-8 relative, and the exp's 6e-6), out of place and in place (out
  // aliasing the logits), which must agree bit for bit. Where the truth is below 1e-30 the result is 0 or the exp's
  // floor, exp(-87) = 1.6e-38.
  const double lse = shift + std::log(sum_truth);
  const float lse_hi = static_cast<float>(lse), lse_lo = static_cast<float>(lse - lse_hi), scale = -0.75f;
  const float folded = scale * std::exp(-lse_lo);  // the scale as backward_rows passes it, carrying lse_lo
  rlhfv::chunk_scaled_softmax(x.data(), out.data(), n, temp, lse_hi, folded, Ahead{});
  std::vector<c10::BFloat16> xb(n), grad_b(n);
  for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<c10::BFloat16>(x[i]);
  std::vector<float> scratch(n);
  rlhfv::chunk_scaled_softmax_bf16(xb.data(), grad_b.data(), scratch.data(), n, temp, lse_hi, folded, Ahead{});
  std::vector<c10::BFloat16> in_place = xb;
  rlhfv::chunk_scaled_softmax_bf16(in_place.data(), in_place.data(), scratch.data(), n, temp, lse_hi, folded, Ahead{});
  report("chunk_scaled_softmax_bf16 in place", n, temp,
         static_cast<double>(std::memcmp(in_place.data(), grad_b.data(), n * sizeof(c10::BFloat16)) != 0), 0.0);
  double worst = 0.0, worst_bf16 = 0.0;
  const auto softmax_error = [&](double logit, double got) {
    const double d = logit / temp - lse, truth = scale * std::exp(d);
    // the exponent is formed in fp32 (x / temp, then - lse): up to an ulp of each of it is the input's, not the exp's
    const double argument = 6e-8 * (std::fabs(logit / temp) + std::fabs(d));
    if (std::fabs(truth) < 1e-30) return std::fabs(got) <= 1.7e-38 ? 0.0 : 1.0;
    return rel(got, truth) - argument;
  };
  for (int64_t i = 0; i < n; ++i) {
    worst = std::fmax(worst, softmax_error(x[i], out[i]));
    worst_bf16 = std::fmax(worst_bf16, softmax_error(static_cast<float>(xb[i]), static_cast<float>(grad_b[i])));
  }
  report("chunk_scaled_softmax", n, temp, worst, 3e-7);
  report("chunk_scaled_softmax_bf16", n, temp, worst_bf16, 0x1p-8 + 6e-6);

  // the soft cap and its gradient: z = cap tanh(x / cap) / temp, softmax(z) sech^2(x / cap) scale
  const float cap = 30.0f;
  rlhfv::chunk_softcap(x.data(), out.data(), n, cap, temp);
  std::vector<double> z(n), sech2(n);
  double zmax = -INFINITY, zsum = 0.0;
  worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double th = std::tanh(static_cast<double>(x[i]) / cap);
    z[i] = cap * th / temp;
    sech2[i] = 1.0 - th * th;
    zmax = std::fmax(zmax, z[i]);
    worst = std::fmax(worst, std::fabs(out[i] - z[i]));
  }
  report("chunk_softcap", n, temp, worst, 4e-7 * cap / temp);
  for (int64_t i = 0; i < n; ++i) zsum += std::exp(z[i] - zmax);
  const double zlse = zmax + std::log(zsum);
  const float zlse_hi = static_cast<float>(zlse), zlse_lo = static_cast<float>(zlse - zlse_hi);
  rlhfv::chunk_softcap_grad(x.data(), out.data(), n, cap, temp, zlse_hi, scale * std::exp(-zlse_lo), Ahead{});
  worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double truth = scale * std::exp(z[i] - zlse) * sech2[i];
    worst = std::fmax(worst, std::fabs(out[i] - truth) / std::fabs(scale));
  }
  report("chunk_softcap_grad", n, temp, worst, 4e-6);

  // the entropy-carrying gradient: slope p (a + b log p), with and without the cap
  const float a = 0.3f, b = -0.2f;
  for (const bool capped : {false, true}) {
    const double row_lse = capped ? zlse : lse;
    const float hi = static_cast<float>(row_lse), lo = static_cast<float>(row_lse - hi);
    if (capped) {
      rlhfv::chunk_softcap_entropy_grad(x.data(), out.data(), n, cap, temp, hi, lo, a, b, Ahead{});
    } else {
      rlhfv::chunk_entropy_grad(x.data(), out.data(), n, cap, temp, hi, lo, a, b, Ahead{});
    }
    worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double slope = capped ? sech2[i] : 1.0;
      const double d = (capped ? z[i] : static_cast<double>(x[i]) / temp) - row_lse, p = std::exp(d);
      const double truth = p > 0 ? slope * p * (a + b * d) : 0.0;
      worst = std::fmax(worst, std::fabs(out[i] - truth));
    }
    report(capped ? "chunk_softcap_entropy_grad" : "chunk_entropy_grad", n, temp, worst, 2e-6);
  }
}

// bf16 and half conversions: round to nearest even like c10, NaN stays NaN, widening exact
template <typename Half>
void check_conversions(std::mt19937& gen, int64_t n, const char* name) {
  std::vector<float> x = random_row(gen, n), back(n);
  x[0] = NAN;
  // exact ties of both formats (bf16 keeps 7 mantissa bits, half 10) between an even and an odd neighbour: round to
  // nearest even goes down, where rounding half up would go up
  for (int64_t i = 1; i < n && i < 9; ++i) {
    const uint32_t even = static_cast<uint32_t>(2 * (i / 2)), bf16 = i % 2;
    const uint32_t tie = 0x3F800000u + (bf16 ? (even << 16) + 0x8000u : (even << 13) + 0x1000u);
    std::memcpy(&x[i], &tie, sizeof(float));
  }
  // fp32 subnormals: AVX512-BF16's rounding (kV4Bf16, whole vectors only) flushes them to 0; c10 keeps bf16 subnormals
  for (int64_t i = 9; i < n && i < 11; ++i) x[i] = i == 9 ? 1e-39f : -3e-40f;
  bool flushes = false;
#if RLHFV_X86_LEVELS
  flushes = std::is_same_v<Half, c10::BFloat16> && rlhfv::cpu_level() == rlhfv::CpuLevel::kV4Bf16;
#endif
  std::vector<Half> h(n);
  rlhfv::store_chunk(x.data(), h.data(), n);
  rlhfv::load_chunk(h.data(), back.data(), n);
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float truth = static_cast<float>(static_cast<Half>(x[i]));
    wrong += !(back[i] == truth || (std::isnan(back[i]) && std::isnan(truth)) ||
               (flushes && std::fabs(x[i]) < 0x1p-126f && back[i] == 0.0f));
  }
  report(name, n, 1.0f, static_cast<double>(wrong), 0.0);
}

}  // namespace

int main() {
  std::mt19937 gen(1234);
  for (const int64_t n : {1, 7, 37, 2048, 2053}) {
    for (const float temp : {1.0f, 0.7f}) check_row(gen, n, temp);
    check_conversions<c10::BFloat16>(gen, n, "bf16 store/load");
    check_conversions<c10::Half>(gen, n, "half store/load");
  }
  std::printf("%s: %d failed\n", rlhfv::cpu_variant_name(), failures);
  return failures == 0 ? 0 : 1;
}
