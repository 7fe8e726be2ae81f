// Small helpers shared by the CPU and CUDA glue of the rlhfv operators.
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>

namespace rlhfv {

// Number of token rows of a [..., V] logits tensor (the product of its leading sizes; 1 for a 1-D tensor).
inline int64_t logp_rows(const at::Tensor& logits) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) rows *= logits.size(d);
  return rows;
}

// The soft cap of the logit transform (ops.cpp): 0 for none, else finite and > 0.
inline void check_softcap(double softcap) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "rlhfv: softcap must be finite and >= 0 (0: none), got ",
              softcap);
}

// Device-independent checks of a (logits, labels) pair; each device adds its own dtype and device checks.
inline void check_logprob_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                 double softcap) {
  TORCH_CHECK(logits.dim() >= 1, "rlhfv: logits must have at least one dimension, got a scalar");
  TORCH_CHECK(logits.size(-1) > 0 || logp_rows(logits) == 0, "rlhfv: logits has an empty vocabulary dimension");
  // Every kernel reads a row as V contiguous values, a 1-D logits tensor included.
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) <= 1,
              "rlhfv: logits must have unit stride along the vocabulary (last) dimension, got stride ",
              logits.stride(-1));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "rlhfv: logits must be float32, bfloat16, float16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "rlhfv: labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), "rlhfv: labels shape ", labels.sizes(),
              " must equal logits.shape[:-1] = ", logits.sizes().slice(0, logits.dim() - 1));
  TORCH_CHECK(labels.device() == logits.device(), "rlhfv: labels are on ", labels.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(temperature > 0.0, "rlhfv: temperature must be > 0, got ", temperature);
  check_softcap(softcap);
}

}  // namespace rlhfv
