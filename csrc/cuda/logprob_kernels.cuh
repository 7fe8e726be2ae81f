// Launchers of the CUDA kernels of the logits path (csrc/cuda/logprob_kernels.cu). Plain CUDA types only, so the
// .cu compiles in seconds and the torch glue (logprob_cuda.cpp) is the only file that sees ATen.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace rlhfv::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Element offsets of the rows of a [..., V] tensor with arbitrary leading strides (V itself has stride 1).
constexpr int kMaxLeadingDims = 8;
struct RowLayout {
  int ndim = 0;
  int64_t sizes[kMaxLeadingDims] = {};
  int64_t strides[kMaxLeadingDims] = {};
};

// Which kernel shape a launch uses: one warp per row (short rows, many of them) or one block per (row, split).
enum class Shape : int { kWarpPerRow = 0, kBlockPerRow = 1 };

struct ForwardArgs {
  const void* logits;
  RowLayout layout;
  const int64_t* labels;  // [rows], contiguous
  int64_t rows;
  int64_t vocab;
  DType dtype;
  int64_t ignore_index;
  float temperature;
  float softcap;       // 0: none; else z = softcap * tanh(x / softcap) / temperature
  int num_splits;      // vocabulary splits per row (1 unless rows are too few to fill the GPU)
  int64_t split_size;  // vocabulary entries per split (a multiple of 8)
  float* part_max;     // [rows, num_splits]
  float* part_sum;     // [rows, num_splits]
  float* target;       // [rows]: z at the label
  double* lse;         // [rows] output, 0 at ignored rows
  float* logp;         // [rows] output, 0 at ignored rows
  // With the entropy (both set, else both null): per-split moments sum exp(z - max) * (z - max), and the entropy
  // -sum p log p per row (0 at ignored rows).
  float* part_moment = nullptr;  // [rows, num_splits]
  float* entropy = nullptr;      // [rows] output
};

struct BackwardArgs {
  const void* logits;
  RowLayout layout;
  void* out;             // dlogits, same dtype as logits
  RowLayout out_layout;  // the logits' own layout when the gradient overwrites them
  const int64_t* labels;
  const float* grad_logp;  // [rows]
  const double* lse;       // [rows], from the forward
  int64_t rows;
  int64_t vocab;
  DType dtype;
  int64_t ignore_index;
  float temperature;
  float softcap;
  int num_splits;
  int64_t split_size;
  // With a gradient for the entropy (both set, else both null): dL/dH per row and the forward's entropy.
  const float* grad_entropy = nullptr;  // [rows]
  const float* entropy = nullptr;       // [rows]
};

// Shape and splits for `rows` rows of `vocab` on a device with `sm_count` multiprocessors.
Shape choose_shape(int64_t rows, int64_t vocab);
int choose_splits(int64_t rows, int64_t vocab, int sm_count, int64_t* split_size);

// Each returns the first CUDA error of its launches (cudaSuccess when all went well).
cudaError_t logprob_forward(const ForwardArgs& args, Shape shape, cudaStream_t stream);
cudaError_t logprob_backward(const BackwardArgs& args, Shape shape, cudaStream_t stream);

}  // namespace rlhfv::cuda
