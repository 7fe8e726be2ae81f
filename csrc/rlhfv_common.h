// Small helpers shared by the CPU and CUDA glue of the rlhfv operators.
#pragma once
#include <ATen/core/Tensor.h>

namespace rlhfv {

// Number of token rows of a [..., V] logits tensor (the product of its leading sizes; 1 for a 1-D tensor).
inline int64_t logp_rows(const at::Tensor& logits) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) rows *= logits.size(d);
  return rows;
}

}  // namespace rlhfv
