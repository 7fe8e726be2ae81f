// Torch glue of the CUDA kernels: checks, allocation, the current stream, and registration for the CUDA dispatch
// key of the rlhfv operators. The kernels themselves are in logprob_kernels.cu (CUDA headers only).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rlhfv_common.h"
#include "logprob_kernels.cuh"

namespace rlhfv {
namespace {

cuda::DType kernel_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "rlhfv: the CUDA kernels take float32, bfloat16 or float16 logits, got ", logits.scalar_type());
}

cuda::RowLayout row_layout(const at::Tensor& t) {
  cuda::RowLayout layout;
  TORCH_CHECK(t.dim() - 1 <= cuda::kMaxLeadingDims, "rlhfv: logits may have at most ", cuda::kMaxLeadingDims,
              " leading dimensions, got ", t.dim() - 1);
  layout.ndim = static_cast<int>(t.dim() - 1);
  for (int d = 0; d < layout.ndim; ++d) {
    layout.sizes[d] = t.size(d);
    layout.strides[d] = t.stride(d);
  }
  return layout;
}

// Validation contract (DESIGN.md §3): the forward refuses out-of-range labels before any launch (one device-to-host
// sync; the kernels never read outside a row, but the result would be silently wrong). The backward trusts the labels
// its forward checked and reads no memory through them, so it costs no sync.
void check_labels(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  if (labels.numel() == 0) return;
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
  TORCH_CHECK_INDEX(!bad.any().item<bool>(), "rlhfv: a label is out of range [0, ", vocab,
                    ") and is not ignore_index (", ignore_index, ")");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rlhfv: ", what, " failed: ", cudaGetErrorString(err));
}

int sm_count(const at::Tensor& t) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()),
             "cudaDeviceGetAttribute");
  return count;
}

struct Prepared {
  at::Tensor labels;
  int64_t rows, vocab;
  cuda::Shape shape;
  int splits;
  int64_t split_size;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, double temperature,
                 double softcap, bool check_label_range) {
  TORCH_CHECK(logits.is_cuda(), "rlhfv: logits must be a CUDA tensor for the CUDA kernels");
  check_logprob_inputs(logits, labels, temperature, softcap);
  kernel_dtype(logits);
  Prepared p;
  p.labels = labels.to(at::kLong).contiguous();
  p.rows = logp_rows(logits);
  p.vocab = logits.size(-1);
  if (check_label_range) check_labels(p.labels, p.vocab, ignore_index);
  p.shape = cuda::choose_shape(p.rows, p.vocab);
  p.splits = cuda::choose_splits(p.rows, p.vocab, sm_count(logits), &p.split_size);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                            int64_t ignore_index, double temperature, double softcap,
                                                            bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, labels, ignore_index, temperature, softcap, /*check_label_range=*/true);
  const auto opts = logits.options();
  at::Tensor logp = at::empty(labels.sizes(), opts.dtype(at::kFloat));
  at::Tensor lse = at::empty(labels.sizes(), opts.dtype(at::kDouble));
  at::Tensor entropy = at::empty(with_entropy ? labels.sizes() : at::IntArrayRef{0}, opts.dtype(at::kFloat));
  if (p.rows == 0) return {logp, lse, entropy};
  at::Tensor part_max = at::empty({p.rows, p.splits}, opts.dtype(at::kFloat));
  at::Tensor part_sum = at::empty({p.rows, p.splits}, opts.dtype(at::kFloat));
  at::Tensor part_moment = at::empty({with_entropy ? p.rows : 0, p.splits}, opts.dtype(at::kFloat));
  at::Tensor target = at::empty({p.rows}, opts.dtype(at::kFloat));
  cuda::ForwardArgs args{logits.const_data_ptr(), row_layout(logits), p.labels.const_data_ptr<int64_t>(),
                         p.rows, p.vocab, kernel_dtype(logits), ignore_index, static_cast<float>(temperature),
                         static_cast<float>(softcap), p.splits, p.split_size, part_max.mutable_data_ptr<float>(),
                         part_sum.mutable_data_ptr<float>(), target.mutable_data_ptr<float>(),
                         lse.mutable_data_ptr<double>(), logp.mutable_data_ptr<float>()};
  if (with_entropy) {
    args.part_moment = part_moment.mutable_data_ptr<float>();
    args.entropy = entropy.mutable_data_ptr<float>();
  }
  check_cuda(cuda::logprob_forward(args, p.shape, c10::cuda::getCurrentCUDAStream().stream()), "logprob forward");
  return {logp, lse, entropy};
}

std::tuple<at::Tensor, at::Tensor> logprob_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                    int64_t ignore_index, double temperature, double softcap,
                                                    bool /*inplace_backward*/) {
  auto [logp, lse, unused] = forward_cuda(logits, labels, ignore_index, temperature, softcap, false);
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_entropy_fwd_cuda(const at::Tensor& logits,
                                                                        const at::Tensor& labels,
                                                                        int64_t ignore_index, double temperature,
                                                                        double softcap, bool /*inplace_backward*/) {
  auto [logp, lse, entropy] = forward_cuda(logits, labels, ignore_index, temperature, softcap, true);
  return {logp, entropy, lse};
}

// grad_entropy and entropy: both null (no entropy gradient) or both of labels' shape.
void run_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                  const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                  const at::Tensor& out, const at::Tensor* grad_entropy = nullptr,
                  const at::Tensor* entropy = nullptr) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, labels, ignore_index, temperature, softcap, /*check_label_range=*/false);
  TORCH_CHECK(grad_logp.sizes() == labels.sizes(), "rlhfv: grad_logp shape ", grad_logp.sizes(),
              " must equal labels shape ", labels.sizes());
  TORCH_CHECK(lse.sizes() == labels.sizes() && lse.scalar_type() == at::kDouble && lse.is_cuda(),
              "rlhfv: lse must be the float64 CUDA tensor returned by logprob_fwd");
  if (grad_entropy != nullptr) {
    TORCH_CHECK(grad_entropy->sizes() == labels.sizes() && entropy->sizes() == labels.sizes() &&
                    grad_entropy->is_cuda() && entropy->is_cuda(),
                "rlhfv: grad_entropy and entropy must be CUDA tensors of labels' shape ", labels.sizes());
  }
  if (p.rows == 0 || p.vocab == 0) return;
  const at::Tensor grad = grad_logp.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  cuda::BackwardArgs args{logits.const_data_ptr(), row_layout(logits), out.data_ptr(), row_layout(out),
                          p.labels.const_data_ptr<int64_t>(), grad.const_data_ptr<float>(),
                          lse_c.const_data_ptr<double>(), p.rows, p.vocab, kernel_dtype(logits), ignore_index,
                          static_cast<float>(temperature), static_cast<float>(softcap), p.splits, p.split_size};
  at::Tensor grad_h, entropy_c;
  if (grad_entropy != nullptr) {
    grad_h = grad_entropy->to(at::kFloat).contiguous();
    entropy_c = entropy->to(at::kFloat).contiguous();
    args.grad_entropy = grad_h.const_data_ptr<float>();
    args.entropy = entropy_c.const_data_ptr<float>();
  }
  check_cuda(cuda::logprob_backward(args, p.shape, c10::cuda::getCurrentCUDAStream().stream()), "logprob backward");
}

at::Tensor logprob_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap) {
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());  // contiguous
  run_backward(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, dlogits);
  return dlogits;
}

void logprob_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& grad_logp, const at::Tensor& labels,
                              const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap) {
  run_backward(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, logits);
}

at::Tensor logprob_entropy_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                    const at::Tensor& entropy, int64_t ignore_index, double temperature,
                                    double softcap) {
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  run_backward(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, dlogits, &grad_entropy, &entropy);
  return dlogits;
}

void logprob_entropy_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& grad_logp,
                                      const at::Tensor& grad_entropy, const at::Tensor& labels,
                                      const at::Tensor& lse, const at::Tensor& entropy, int64_t ignore_index,
                                      double temperature, double softcap) {
  run_backward(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, logits, &grad_entropy, &entropy);
}

}  // namespace
}  // namespace rlhfv

TORCH_LIBRARY_IMPL(rlhfv, CUDA, m) {
  m.impl("logprob_fwd", &rlhfv::logprob_fwd_cuda);
  m.impl("logprob_bwd", &rlhfv::logprob_bwd_cuda);
  m.impl("logprob_bwd_", &rlhfv::logprob_bwd_inplace_cuda);
  m.impl("logprob_entropy_fwd", &rlhfv::logprob_entropy_fwd_cuda);
  m.impl("logprob_entropy_bwd", &rlhfv::logprob_entropy_bwd_cuda);
  m.impl("logprob_entropy_bwd_", &rlhfv::logprob_entropy_bwd_inplace_cuda);
}
