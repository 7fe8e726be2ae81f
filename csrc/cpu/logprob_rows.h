// Row kernels of the logits path on CPU, for the other CPU operators that produce logits themselves (the
// fused-linear path computes them a chunk at a time). Defined in logprob_cpu.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace rlhfv::cpu {

// logp (float32; float64 for float64 logits) and lse (float64), both contiguous with one value per row of `logits`
// ([..., V], unit stride along V); labels int64 contiguous. `entropy` (nullptr: not computed) like logp: the entropy
// of softmax(z) per row, 0 at ignored rows.
void logprob_rows_forward(const at::Tensor& logits, const at::Tensor& labels, at::Tensor& logp, at::Tensor& lse,
                          at::Tensor* entropy, int64_t ignore_index, double temperature, double softcap);

// Writes grad[r] * (onehot - softmax(z)) * dz/dx for every row into `out` (z: the transformed logits, see ops.cpp),
// which has logits' shape and dtype and may be `logits` itself. grad: contiguous, float32 (float64 for float64 logits).
// With grad_entropy and the forward's entropy (same dtype and layout as grad) it adds grad_entropy[r] * dH/dx.
void logprob_rows_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& grad,
                           const at::Tensor& lse, at::Tensor& out, int64_t ignore_index, double temperature,
                           double softcap, const at::Tensor* grad_entropy = nullptr,
                           const at::Tensor* entropy = nullptr);

}  // namespace rlhfv::cpu
