// CPU kernels of the logits path: per-token log-probabilities (forward) and dlogits (backward).
//
// Each row of V logits is read in L1-sized chunks: one pass keeps a running (max, sum of exp) pair, so no N x V
// temporary is ever allocated. Arithmetic is fp32 whatever the input dtype; the row LSE is kept in float64 so that the
// backward's exp(x - lse) stays accurate when |logits| is large (an fp32 LSE of 1e4 is off by 5e-4).
// Only light headers are included (see DESIGN.md §5): this file compiles in seconds.
// The chunk sweeps they chain are in sweeps.h, on the SIMD layer of simd.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../rlhfv_common.h"
#include "logprob_rows.h"
#include "sweeps.h"

namespace rlhfv {
namespace {


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

// For ops.cpp's rlhfv_kernels._C.cpu_variant().
extern "C" const char* rlhfv_cpu_variant() { return rlhfv::cpu_variant_name(); }

TORCH_LIBRARY_IMPL(rlhfv, CPU, m) {
  m.impl("logprob_fwd", &rlhfv::logprob_fwd_cpu);
  m.impl("logprob_bwd", &rlhfv::logprob_bwd_cpu);
  m.impl("logprob_bwd_", &rlhfv::logprob_bwd_inplace_cpu);
  m.impl("logprob_entropy_fwd", &rlhfv::logprob_entropy_fwd_cpu);
  m.impl("logprob_entropy_bwd", &rlhfv::logprob_entropy_bwd_cpu);
  m.impl("logprob_entropy_bwd_", &rlhfv::logprob_entropy_bwd_inplace_cpu);
}
