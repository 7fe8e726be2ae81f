// CUDA kernels of the logits path (DESIGN.md §2): per-row online LSE + target logit, and dlogits.
//
// Two shapes: one warp per row for short rows (V <= kWarpRowMaxVocab, many rows per block), one block per
// (row, vocabulary split) otherwise; splits keep the GPU busy when rows are few (N = 512, V = 256k). Each thread
// reads 16-byte vectors where the row is aligned, with scalar head and tail elements; arithmetic is fp32 and the
// split partials are merged in float64. Includes only CUDA headers, so this file compiles in seconds.
#include "logprob_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace rlhfv::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;
constexpr int64_t kWarpRowMaxVocab = 2048;
constexpr int64_t kMinSplit = 8192;
constexpr int kVecBytes = 16;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::kSize]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = to_float(e[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::kSize]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) e[k] = from_float<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ int64_t row_offset(const RowLayout& layout, int64_t row) {
  int64_t offset = 0;
  for (int d = layout.ndim - 1; d >= 0; --d) {
    offset += (row % layout.sizes[d]) * layout.strides[d];
    row /= layout.sizes[d];
  }
  return offset;
}

// Elements before `p + start` reaches 16-byte alignment (pointers are always element-aligned).
template <typename T>
__device__ __forceinline__ int64_t unaligned_head(const T* p, int64_t start, int64_t stop) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p + start);
  const int64_t head = static_cast<int64_t>((kVecBytes - addr % kVecBytes) % kVecBytes) / sizeof(T);
  return head < stop - start ? head : stop - start;
}

// x / t, correctly rounded like eager PyTorch (CUDA's '/' is IEEE division unless built with fast math); no division
// at t == 1. Not x * (1/t): that rounds twice, about 1 ulp, which at |logits| ~ 1e4 exceeds the eager error.
__device__ __forceinline__ float scaled(float x, float t) { return t == 1.0f ? x : x / t; }

// The logit transform (ops.cpp): z = x / t, or z = c * tanh(x / c) / t with a soft cap c > 0. The cap is the same for
// every thread, so the branch does not diverge.
__device__ __forceinline__ float transformed(float x, float t, float c) {
  return c > 0.0f ? scaled(c * tanhf(x / c), t) : scaled(x, t);
}

// dz/dx / (1 / t) of the transform: sech^2(x / c) with a soft cap, else 1.
__device__ __forceinline__ float slope(float x, float c) {
  if (c <= 0.0f) return 1.0f;
  const float th = tanhf(x / c);
  return 1.0f - th * th;
}

// Running (max, sum of exp(x - max)) of the values one thread has seen; with the entropy also the moment
// q = sum exp(x - max) * (x - max), moved with the max: q <- e^d (q + d s), d = old max - new max.
struct MaxSum {
  float m;
  float s;
  float q;
};

template <bool kEntropy>
__device__ __forceinline__ void absorb(MaxSum& a, float x) {
  if (x > a.m) {
    // A +inf logit makes the softmax undefined: poison the row (NaN), as log_softmax does.
    if (x == INFINITY) {
      a.s = NAN;
    } else {
      const float d = a.m - x, e = expf(d);
      if (kEntropy) a.q = a.s > 0.0f ? e * (a.q + d * a.s) : 0.0f;  // (the new value adds e^0 * 0)
      a.s = a.s * e + 1.0f;
    }
    a.m = x;
  } else if (x != -INFINITY) {  // -inf (masked entries) adds exp(-inf) = 0; NaN falls through and poisons the sum
    const float t = x - a.m, e = expf(t);
    a.s += e;
    if (kEntropy) a.q += e * t;
  }
}

// One side's (s, q) moved to the max m; an empty side (s = 0, max -inf) adds nothing.
template <bool kEntropy>
__device__ __forceinline__ void moved(const MaxSum& a, float m, float& s, float& q) {
  const float d = a.m - m, e = a.s > 0.0f ? expf(d) : 0.0f;
  s += a.s * e;
  if (kEntropy && a.s > 0.0f) q += e * (a.q + d * a.s);
}

template <bool kEntropy>
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s, 0.0f};
  if (!kEntropy) return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m), 0.0f};
  float s = 0.0f, q = 0.0f;
  if (a.s != a.s || b.s != b.s) return {m, NAN, NAN};  // a poisoned side stays poisoned
  moved<kEntropy>(a, m, s, q);
  moved<kEntropy>(b, m, s, q);
  return {m, s, q};
}

template <bool kEntropy>
__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                 kEntropy ? __shfl_xor_sync(0xffffffffu, v.q, offset) : 0.0f};
    v = merge<kEntropy>(v, other);
  }
  return v;
}

template <bool kEntropy>
__device__ __forceinline__ MaxSum block_merge(MaxSum v) {
  __shared__ float shared_m[kBlockThreads / kWarp];
  __shared__ float shared_s[kBlockThreads / kWarp];
  __shared__ float shared_q[kBlockThreads / kWarp];
  v = warp_merge<kEntropy>(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    shared_m[warp] = v.m;
    shared_s[warp] = v.s;
    if (kEntropy) shared_q[warp] = v.q;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    v = lane < warps ? MaxSum{shared_m[lane], shared_s[lane], kEntropy ? shared_q[lane] : 0.0f}
                     : MaxSum{-INFINITY, 0.0f, 0.0f};
    v = warp_merge<kEntropy>(v);
  }
  return v;  // valid in thread 0
}

// Which row, split and thread slot this thread works on, for either shape.
template <bool kWarpPerRow>
struct Work {
  int64_t row;
  int split;
  int tid;
  int threads;
  __device__ Work() {
    if (kWarpPerRow) {
      row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
      split = 0;
      tid = threadIdx.x % kWarp;
      threads = kWarp;
    } else {
      row = blockIdx.x;
      split = blockIdx.y;
      tid = threadIdx.x;
      threads = blockDim.x;
    }
  }
};

// f(x) for every element of p[start, stop) this thread owns: scalar head, 16-byte vectors, scalar tail.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const T* p, int64_t start, int64_t stop, int tid, int threads, F f) {
  constexpr int V = Vec<T>::kSize;
  const int64_t body = start + unaligned_head(p, start, stop);
  for (int64_t i = start + tid; i < body; i += threads) f(to_float(p[i]));
  const int64_t vectors = (stop - body) / V;
  for (int64_t v = tid; v < vectors; v += threads) {
    float x[V];
    load_vec(p + body + v * V, x);
#pragma unroll
    for (int k = 0; k < V; ++k) f(x[k]);
  }
  for (int64_t i = body + vectors * V + tid; i < stop; i += threads) f(to_float(p[i]));
}

template <typename T, bool kWarpPerRow, bool kEntropy>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(ForwardArgs a) {
  const Work<kWarpPerRow> w;
  if (w.row >= a.rows) return;  // uniform across the warp (warp shape) or the block (block shape)
  const int64_t label = a.labels[w.row];
  const bool active = label != a.ignore_index;
  const T* p = static_cast<const T*>(a.logits) + row_offset(a.layout, w.row);
  const int64_t start = w.split * a.split_size;
  const int64_t stop = start + a.split_size < a.vocab ? start + a.split_size : a.vocab;
  MaxSum acc{-INFINITY, 0.0f, 0.0f};
  if (active) {
    const float t = a.temperature, c = a.softcap;
    for_each_value(p, start, stop, w.tid, w.threads, [&](float x) { absorb<kEntropy>(acc, transformed(x, t, c)); });
  }
  if constexpr (kWarpPerRow) {
    acc = warp_merge<kEntropy>(acc);
  } else {
    acc = block_merge<kEntropy>(acc);
  }
  if (w.tid == 0) {
    const int64_t out = w.row * a.num_splits + w.split;
    a.part_max[out] = acc.m;
    a.part_sum[out] = acc.s;
    if (kEntropy) a.part_moment[out] = acc.q;
    if (active && label >= start && label < stop) {
      a.target[w.row] = transformed(to_float(p[label]), a.temperature, a.softcap);
    }
  }
}

// One thread per row: merges the splits' partials in float64 into the LSE and the log-prob.
__global__ void combine_kernel(ForwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.rows) return;
  if (a.labels[row] == a.ignore_index) {
    a.lse[row] = 0.0;
    a.logp[row] = 0.0f;
    if (a.entropy != nullptr) a.entropy[row] = 0.0f;
    return;
  }
  const float* pm = a.part_max + row * a.num_splits;
  const float* ps = a.part_sum + row * a.num_splits;
  float top = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) top = fmaxf(top, pm[s]);
  double sum = 0.0, moment = 0.0;
  for (int s = 0; s < a.num_splits; ++s) {
    if (pm[s] == -INFINITY) continue;  // a split of masked entries contributes 0
    const double d = static_cast<double>(pm[s]) - static_cast<double>(top), e = exp(d);
    sum += static_cast<double>(ps[s]) * e;
    if (a.entropy != nullptr) moment += e * (static_cast<double>(a.part_moment[row * a.num_splits + s]) + d * ps[s]);
  }
  const double lse = static_cast<double>(top) + log(sum);
  a.lse[row] = lse;
  a.logp[row] = static_cast<float>(static_cast<double>(a.target[row]) - lse);
  if (a.entropy != nullptr) a.entropy[row] = static_cast<float>(log(sum) - moment / sum);  // H = log S1 - S2 / S1
}

template <typename T, bool kWarpPerRow>
__global__ void __launch_bounds__(kBlockThreads) backward_kernel(BackwardArgs a) {
  constexpr int V = Vec<T>::kSize;
  const Work<kWarpPerRow> w;
  if (w.row >= a.rows) return;
  const int64_t label = a.labels[w.row];
  const float coef = a.grad_logp[w.row];
  const bool with_entropy = a.grad_entropy != nullptr;  // the same for every thread: no divergence
  const float coef_h = with_entropy ? a.grad_entropy[w.row] : 0.0f;
  T* out = static_cast<T*>(a.out) + row_offset(a.out_layout, w.row);
  const int64_t start = w.split * a.split_size;
  const int64_t stop = start + a.split_size < a.vocab ? start + a.split_size : a.vocab;
  if (label == a.ignore_index || (coef == 0.0f && coef_h == 0.0f)) {  // no gradient: write zeros, read nothing
    for (int64_t i = start + w.tid; i < stop; i += w.threads) out[i] = from_float<T>(0.0f);
    return;
  }
  const T* p = static_cast<const T*>(a.logits) + row_offset(a.layout, w.row);
  const double lse = a.lse[w.row];
  const float lse_hi = static_cast<float>(lse);
  const float lse_lo = static_cast<float>(lse - static_cast<double>(lse_hi));
  const float t = a.temperature, cap = a.softcap;
  const float on_label = scaled(coef, t);
  const float scale = -on_label;
  // With the entropy: dH/dz_j = -p_j (log p_j + H), so off the label p * (ea + eb * log p), ea = -(g + g_H H) / t,
  // eb = -g_H / t (log p clamped at -87: a masked logit gives p ~ 0 times a finite factor, not 0 * -inf).
  const float row_entropy = with_entropy ? a.entropy[w.row] : 0.0f;
  const float ea = -scaled(coef + coef_h * row_entropy, t), eb = -scaled(coef_h, t);
  auto grad = [&](int64_t i, float x) {
    const float log_prob = (transformed(x, t, cap) - lse_hi) - lse_lo;
    const float prob = expf(log_prob);
    // At the label, c/t * (1 - p) rather than c/t - c/t * p: the difference of near-equal terms loses bits.
    if (with_entropy) {
      const float lp = log_prob < -87.0f ? -87.0f : log_prob;
      return (i == label ? on_label * (1.0f - prob) + prob * eb * (log_prob + row_entropy) : prob * (ea + eb * lp)) *
             slope(x, cap);
    }
    return (i == label ? on_label * (1.0f - prob) : scale * prob) * slope(x, cap);
  };
  // Vectors only where source and destination share their alignment (always so in place).
  const bool same_alignment =
      reinterpret_cast<uintptr_t>(p) % kVecBytes == reinterpret_cast<uintptr_t>(out) % kVecBytes;
  const int64_t body = same_alignment ? start + unaligned_head(p, start, stop) : stop;
  for (int64_t i = start + w.tid; i < body; i += w.threads) out[i] = from_float<T>(grad(i, to_float(p[i])));
  const int64_t vectors = (stop - body) / V;
  for (int64_t v = w.tid; v < vectors; v += w.threads) {
    const int64_t base = body + v * V;
    float x[V];
    load_vec(p + base, x);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = grad(base + k, x[k]);
    store_vec(out + base, x);
  }
  for (int64_t i = body + vectors * V + w.tid; i < stop; i += w.threads)
    out[i] = from_float<T>(grad(i, to_float(p[i])));
}

template <typename T, bool kEntropy>
void launch_forward_kernel(const ForwardArgs& a, Shape shape, cudaStream_t stream) {
  if (shape == Shape::kWarpPerRow) {
    const int rows_per_block = kBlockThreads / kWarp;
    const dim3 grid(static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block));
    forward_kernel<T, true, kEntropy><<<grid, kBlockThreads, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.num_splits));
    forward_kernel<T, false, kEntropy><<<grid, kBlockThreads, 0, stream>>>(a);
  }
}

template <typename T>
cudaError_t launch_forward(const ForwardArgs& a, Shape shape, cudaStream_t stream) {
  if ((a.part_moment == nullptr) != (a.entropy == nullptr)) return cudaErrorInvalidValue;
  if (a.entropy != nullptr) {
    launch_forward_kernel<T, true>(a, shape, stream);
  } else {
    launch_forward_kernel<T, false>(a, shape, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_kernel<<<static_cast<unsigned>((a.rows + kBlockThreads - 1) / kBlockThreads), kBlockThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardArgs& a, Shape shape, cudaStream_t stream) {
  if ((a.grad_entropy == nullptr) != (a.entropy == nullptr)) return cudaErrorInvalidValue;
  if (shape == Shape::kWarpPerRow) {
    const int rows_per_block = kBlockThreads / kWarp;
    const dim3 grid(static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block));
    backward_kernel<T, true><<<grid, kBlockThreads, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.num_splits));
    backward_kernel<T, false><<<grid, kBlockThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

Shape choose_shape(int64_t rows, int64_t vocab) {
  (void)rows;
  return vocab <= kWarpRowMaxVocab ? Shape::kWarpPerRow : Shape::kBlockPerRow;
}

int choose_splits(int64_t rows, int64_t vocab, int sm_count, int64_t* split_size) {
  int splits = 1;
  const int64_t wanted_blocks = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  if (choose_shape(rows, vocab) == Shape::kBlockPerRow && rows < wanted_blocks) {
    const int64_t by_rows = (wanted_blocks + rows - 1) / (rows > 0 ? rows : 1);
    const int64_t by_vocab = vocab / kMinSplit;
    const int64_t chosen = by_rows < by_vocab ? by_rows : by_vocab;
    splits = static_cast<int>(chosen > 1 ? (chosen < 65535 ? chosen : 65535) : 1);
  }
  // Split starts stay 16-byte aligned relative to the row start (a multiple of 8 elements).
  int64_t size = (vocab + splits - 1) / splits;
  size = (size + 7) / 8 * 8;
  *split_size = size > 0 ? size : 8;
  return static_cast<int>((vocab + *split_size - 1) / *split_size > 0 ? (vocab + *split_size - 1) / *split_size : 1);
}

cudaError_t logprob_forward(const ForwardArgs& args, Shape shape, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_forward<float>(args, shape, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(args, shape, stream);
    case DType::kFloat16:
      return launch_forward<__half>(args, shape, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t logprob_backward(const BackwardArgs& args, Shape shape, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_backward<float>(args, shape, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(args, shape, stream);
    case DType::kFloat16:
      return launch_backward<__half>(args, shape, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rlhfv::cuda
