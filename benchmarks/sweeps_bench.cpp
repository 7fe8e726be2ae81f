// Time of each CPU chunk sweep of csrc/cpu/sweeps.h (no torch) on one thread, on
// a chunk that stays in L1: pure compute, no memory traffic. benchmarks/sweeps.py builds and runs it at each x86-64
// level (RLHFV_CPU_LEVEL) and adds the sweeps up into the compute of a forward+backward per logit.
// Usage: sweeps_bench REPS. Prints one line per sweep: its name and nanoseconds per logit (the fastest of 5 rounds of
// REPS calls on a kChunk-logit chunk); then the variant that ran and the chunk's length.
#include "../csrc/cpu/sweeps.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace {

volatile float sink = 0.0f;  // every timed call feeds it, so the optimizer cannot drop the call

template <typename Fn>
void time_sweep(const char* name, int64_t n, int reps, const Fn& fn) {
  double best = 1e300;
  for (int round = 0; round < 5; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) sink = sink + fn();
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / reps);
  }
  std::printf("%s %.5f\n", name, best / n);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace rlhfv;
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20000;
  const int64_t n = kChunk;
  // logits like a model's (normal, scale 3), shifted below 0 as the sweeps see them after the max or the LSE
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(-10.0f, 3.0f);
  std::vector<float> x(n), out(n);
  std::vector<c10::BFloat16> xb(n), outb(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = normal(gen);
    xb[i] = static_cast<c10::BFloat16>(x[i]);
  }
  const float cap = 30.0f, temp = 1.0f, lse_hi = 0.0f, lse_lo = 0.0f, scale = -0.5f, a = -0.5f, b = 0.1f;
  time_sweep("chunk_max", n, reps, [&] { return chunk_max(x.data(), n); });
  time_sweep("chunk_sum_exp", n, reps, [&] { return chunk_sum_exp(x.data(), n, temp, 0.0f, Ahead{}); });
  time_sweep("chunk_sum_exp_and_moment", n, reps, [&] {
    float s1 = 0.0f, s2 = 0.0f;
    chunk_sum_exp_and_moment(x.data(), n, temp, 0.0f, Ahead{}, &s1, &s2);
    return s1 + s2;
  });
  time_sweep("chunk_scaled_softmax", n, reps, [&] {
    chunk_scaled_softmax(x.data(), out.data(), n, temp, lse_hi, scale, Ahead{});
    return out[n / 2];
  });
  time_sweep("chunk_scaled_softmax_bf16", n, reps, [&] {
    chunk_scaled_softmax_bf16(xb.data(), outb.data(), out.data(), n, temp, lse_hi, scale, Ahead{});
    return static_cast<float>(outb[n / 2]);
  });
  time_sweep("chunk_entropy_grad", n, reps, [&] {
    chunk_entropy_grad(x.data(), out.data(), n, cap, temp, lse_hi, lse_lo, a, b, Ahead{});
    return out[n / 2];
  });
  time_sweep("load_chunk_bf16", n, reps, [&] {
    load_chunk(xb.data(), out.data(), n);
    return out[n / 2];
  });
  time_sweep("store_chunk_bf16", n, reps, [&] {
    store_chunk(x.data(), outb.data(), n);
    return static_cast<float>(outb[n / 2]);
  });
  time_sweep("chunk_softcap", n, reps, [&] {
    chunk_softcap(x.data(), out.data(), n, cap, temp);
    return out[n / 2];
  });
  time_sweep("chunk_softcap_grad", n, reps, [&] {
    chunk_softcap_grad(x.data(), out.data(), n, cap, temp, lse_hi, scale, Ahead{});
    return out[n / 2];
  });
  std::printf("variant %s\nchunk %lld\n", rlhfv::cpu_variant_name(), static_cast<long long>(n));
  return 0;
}
