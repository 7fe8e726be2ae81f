// CPU fused-linear path: per-token log-probs from hidden states and the lm_head weight, `chunk_rows` tokens at a
// time, so peak extra memory is one chunk of logits (chunk_rows x V) whatever N is. The matmuls go through ATen
// (BLAS); the softmax work reuses the logits-path row kernels (logprob_rows.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>

#include "../rlhfv_common.h"
#include "logprob_rows.h"

namespace rlhfv {
namespace {

struct LinearInputs {
  at::Tensor hidden;  // [N, H], contiguous
  at::Tensor labels;  // [N], int64
  int64_t rows;
  int64_t chunk;
};

LinearInputs prepare_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& labels, double temperature, double softcap, int64_t chunk_rows) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "rlhfv: hidden and weight must be CPU tensors");
  TORCH_CHECK(hidden.dim() >= 1, "rlhfv: hidden must have at least one dimension");
  TORCH_CHECK(weight.dim() == 2, "rlhfv: weight must be [V, H], got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(-1), "rlhfv: weight is ", weight.sizes(), " but hidden has H = ",
              hidden.size(-1));
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "rlhfv: weight dtype ", weight.scalar_type(),
              " differs from hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "rlhfv: hidden must be floating point");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "rlhfv: bias must be [V] = [", weight.size(0),
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "rlhfv: bias dtype differs from hidden dtype");
  }
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "rlhfv: labels must be int64 or int32");
  TORCH_CHECK(labels.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), "rlhfv: labels shape ", labels.sizes(),
              " must equal hidden.shape[:-1]");
  TORCH_CHECK(temperature > 0.0, "rlhfv: temperature must be > 0, got ", temperature);
  check_softcap(softcap);
  TORCH_CHECK(chunk_rows > 0, "rlhfv: chunk_rows must be > 0, got ", chunk_rows);
  LinearInputs in;
  in.hidden = hidden.reshape({-1, hidden.size(-1)}).contiguous();  // N x H: small next to N x V
  in.labels = labels.reshape({-1}).to(at::kLong).contiguous();
  in.rows = in.hidden.size(0);
  in.chunk = chunk_rows;
  return in;
}

at::Tensor chunk_logits(const at::Tensor& hidden_chunk, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, hidden_chunk, weight.t()) : at::mm(hidden_chunk, weight.t());
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& labels, int64_t ignore_index,
                                                              double temperature, double softcap, int64_t chunk_rows,
                                                              bool with_entropy) {
  const LinearInputs in = prepare_linear(hidden, weight, bias, labels, temperature, softcap, chunk_rows);
  at::Tensor logp = at::empty({in.rows}, hidden.options().dtype(acc_type(hidden)));
  at::Tensor lse = at::empty({in.rows}, hidden.options().dtype(at::kDouble));
  at::Tensor entropy = at::empty({with_entropy ? in.rows : 0}, logp.options());
  for (int64_t start = 0; start < in.rows; start += in.chunk) {
    const int64_t n = std::min(in.chunk, in.rows - start);
    const at::Tensor logits = chunk_logits(in.hidden.narrow(0, start, n), weight, bias);
    at::Tensor logp_chunk = logp.narrow(0, start, n);
    at::Tensor lse_chunk = lse.narrow(0, start, n);
    at::Tensor entropy_chunk = with_entropy ? entropy.narrow(0, start, n) : entropy;
    cpu::logprob_rows_forward(logits, in.labels.narrow(0, start, n), logp_chunk, lse_chunk,
                              with_entropy ? &entropy_chunk : nullptr, ignore_index, temperature, softcap);
  }
  return {logp.view(labels.sizes()), lse.view(labels.sizes()),
          with_entropy ? entropy.view(labels.sizes()) : entropy};
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& labels, int64_t ignore_index,
                                                          double temperature, double softcap, int64_t chunk_rows) {
  auto [logp, lse, unused] =
      linear_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows, false);
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_entropy_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double temperature, double softcap, int64_t chunk_rows) {
  auto [logp, lse, entropy] =
      linear_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows, true);
  return {logp, entropy, lse};
}

// grad_entropy and entropy: both undefined (no entropy gradient) or both of labels' shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double temperature, double softcap, int64_t chunk_rows, const at::Tensor& grad_entropy,
    const at::Tensor& entropy) {
  const LinearInputs in = prepare_linear(hidden, weight, bias, labels, temperature, softcap, chunk_rows);
  TORCH_CHECK(grad_logp.sizes() == labels.sizes() && lse.sizes() == labels.sizes(),
              "rlhfv: grad_logp and lse must have labels' shape");
  const bool with_entropy = grad_entropy.defined();
  if (with_entropy) {
    TORCH_CHECK(grad_entropy.sizes() == labels.sizes() && entropy.sizes() == labels.sizes(),
                "rlhfv: grad_entropy and entropy must have labels' shape");
  }
  const auto acc = acc_type(hidden);
  const at::Tensor grad = grad_logp.reshape({-1}).to(acc).contiguous();
  const at::Tensor lse_flat = lse.reshape({-1}).contiguous();
  const at::Tensor grad_h = with_entropy ? grad_entropy.reshape({-1}).to(acc).contiguous() : at::Tensor();
  const at::Tensor entropy_flat = with_entropy ? entropy.reshape({-1}).to(acc).contiguous() : at::Tensor();
  at::Tensor dhidden = at::zeros_like(in.hidden);
  at::Tensor dweight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  at::Tensor dbias = bias.has_value() ? at::zeros({weight.size(0)}, weight.options().dtype(acc))
                                      : at::empty({0}, weight.options());
  at::Tensor has_grad = grad.ne(0);
  if (with_entropy) has_grad = has_grad.logical_or(grad_h.ne(0));
  const at::Tensor active = has_grad.logical_and(in.labels.ne(ignore_index));
  for (int64_t start = 0; start < in.rows; start += in.chunk) {
    const int64_t n = std::min(in.chunk, in.rows - start);
    if (!active.narrow(0, start, n).any().item<bool>()) continue;  // no gradient here: skip both matmuls
    const at::Tensor h = in.hidden.narrow(0, start, n);
    at::Tensor dlogits = chunk_logits(h, weight, bias);  // recomputed, then overwritten by its gradient
    const at::Tensor grad_h_chunk = with_entropy ? grad_h.narrow(0, start, n) : grad_h;
    const at::Tensor entropy_chunk = with_entropy ? entropy_flat.narrow(0, start, n) : entropy_flat;
    cpu::logprob_rows_backward(dlogits, in.labels.narrow(0, start, n), grad.narrow(0, start, n),
                               lse_flat.narrow(0, start, n), dlogits, ignore_index, temperature, softcap,
                               with_entropy ? &grad_h_chunk : nullptr, with_entropy ? &entropy_chunk : nullptr);
    dhidden.narrow(0, start, n).copy_(at::mm(dlogits, weight));
    const at::Tensor dlogits_acc = dlogits.to(acc);
    dweight.addmm_(dlogits_acc.t(), h.to(acc));
    if (bias.has_value()) dbias.add_(dlogits_acc.sum(0));
  }
  return {dhidden.view(hidden.sizes()), dweight.to(weight.scalar_type()),
          bias.has_value() ? dbias.to(weight.scalar_type()) : dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_bwd_cpu(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double temperature, double softcap, int64_t chunk_rows) {
  return linear_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap,
                         chunk_rows, at::Tensor(), at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_entropy_bwd_cpu(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
    int64_t ignore_index, double temperature, double softcap, int64_t chunk_rows) {
  return linear_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap,
                         chunk_rows, grad_entropy, entropy);
}

}  // namespace
}  // namespace rlhfv

TORCH_LIBRARY_IMPL(rlhfv, CPU, m) {
  m.impl("linear_logprob_fwd", &rlhfv::linear_logprob_fwd_cpu);
  m.impl("linear_logprob_bwd", &rlhfv::linear_logprob_bwd_cpu);
  m.impl("linear_logprob_entropy_fwd", &rlhfv::linear_logprob_entropy_fwd_cpu);
  m.impl("linear_logprob_entropy_bwd", &rlhfv::linear_logprob_entropy_bwd_cpu);
}
