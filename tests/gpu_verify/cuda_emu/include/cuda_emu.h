// cuda_emu.h: runs rlhfv's plain CUDA C++ kernels (csrc/cuda/*.cu, unchanged) on the CPU, for correctness tests in
// CI on machines without a GPU (tests/test_cuda_emu.py). One OS thread per CUDA thread.
//
// Semantics modelled (the ones rlhfv's kernels rely on):
//   * blocks run one after another; the threads of a block run concurrently as std::threads, so __shared__
//     (mapped to `static`) is one copy shared by the running block, exactly like on the GPU;
//   * __syncthreads(): barrier over the block's threads that have not exited (exited threads count as arrived,
//     as on sm_70+); a barrier that cannot complete (divergent __syncthreads) aborts with a message, not a hang;
//   * __shfl_*_sync(mask, ...): exchange among the lanes in `mask`; aborts if a lane named in the mask has exited
//     or calls a different shuffle (both undefined behaviour on the GPU);
//   * 16-byte vector types are alignas(16), so -fsanitize=alignment reports misaligned uint4/float4 accesses
//     (the GPU's 'misaligned address' fault); -fsanitize=address reports out-of-bounds (compute-sanitizer memcheck);
//     -fsanitize=thread reports shared-memory races, e.g. a missing __syncthreads (compute-sanitizer racecheck);
//   * a launch configuration the GPU would refuse (no threads, > 1024 threads, grid.y/z > 65535) sets the error that
//     cudaGetLastError() then returns, and runs nothing.
// Not modelled: performance, warp-synchronous execution without *_sync (each thread is independent, which is the
// CUDA >= 9 contract), the precision of fast-math intrinsics (expf/logf are the C library's here), atomics beyond
// what <atomic> gives, streams (every launch completes before it returns), grid.x beyond 2^31 - 1.
//
// Kernel launches `k<<<grid, block, smem, stream>>>(args)` must be rewritten to `::emu::launch(k, grid, block, smem,
// stream)(args)` before compiling (tests/gpu_verify/cuda_emu/build.py does it).
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static  // one block runs at a time: one copy, shared by its threads

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: block (%u,%u,%u) thread (%u,%u,%u): %s\n", blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z, what);
  std::abort();
}

inline thread_local cudaError_t last_error = cudaSuccess;
constexpr auto kDeadlock = std::chrono::seconds(20);

// Barrier over a set of participants that may exit while others wait (exited = arrived from then on).
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int live = 0, arrived = 0;
  uint64_t phase = 0;
  void reset(int n) { live = n; arrived = 0; }
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(m);
    const uint64_t my = phase;
    if (++arrived == live) {
      arrived = 0; ++phase; cv.notify_all(); return;
    }
    if (!cv.wait_for(lock, kDeadlock, [&] { return phase != my; })) fail(what);
  }
  void exit() {
    std::lock_guard<std::mutex> lock(m);
    --live;
    if (arrived > 0 && arrived == live) { arrived = 0; ++phase; cv.notify_all(); }
  }
};

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  uint32_t exited = 0;        // lanes that have returned
  uint32_t arrived = 0;       // lanes in the current exchange
  uint64_t phase = 0;
  int site[32] = {};          // call site (line) of each lane's current shuffle
  unsigned char slot[32][8];  // values being exchanged
};

struct Block {
  Barrier bar;
  std::vector<Warp> warps;
};
inline Block* block_ = nullptr;

inline int lane_id() { return static_cast<int>((threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) % 32); }
inline int warp_id() { return static_cast<int>((threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) / 32); }

// One exchange among the lanes of `mask`: every lane publishes `v`, waits for all, reads lane `src(lane)`.
template <typename T, typename Src>
T exchange(unsigned mask, T v, Src src, int width, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width must be a power of two <= 32");
  Warp& w = block_->warps[warp_id()];
  const int lane = lane_id();
  if (!(mask >> lane & 1u)) fail("__shfl_*_sync called by a lane that is not in its mask");
  std::unique_lock<std::mutex> lock(w.m);
  if (w.exited & mask) fail("__shfl_*_sync mask names a lane that has exited (undefined behaviour on the GPU)");
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.site[lane] = line;
  const uint64_t my = w.phase;
  const unsigned need = static_cast<unsigned>(__builtin_popcount(mask));
  if (++w.arrived == need) {
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && w.site[l] != line) fail("lanes of one mask are in different __shfl_*_sync calls");
    w.arrived = 0; ++w.phase; w.cv.notify_all();
  } else if (!w.cv.wait_for(lock, kDeadlock, [&] { return w.phase != my || (w.exited & mask); })) {
    fail("__shfl_*_sync never completed: a lane of the mask did not arrive");
  } else if (w.phase == my) {
    fail("__shfl_*_sync mask names a lane that has exited (undefined behaviour on the GPU)");
  }
  int s = src(lane);
  const int base = lane / width * width;
  if (s < base || s >= base + width) s = lane;  // out-of-segment source: own value, as for shfl_up/down edges
  if (!(mask >> s & 1u)) fail("__shfl_*_sync reads a lane that is not in the mask (undefined on the GPU)");
  T r;
  std::memcpy(&r, w.slot[s], sizeof(T));
  // Second rendezvous so that no lane overwrites a slot before everyone has read it.
  const uint64_t my2 = w.phase;
  if (++w.arrived == need) { w.arrived = 0; ++w.phase; w.cv.notify_all(); }
  else if (!w.cv.wait_for(lock, kDeadlock, [&] { return w.phase != my2; })) fail("__shfl_*_sync second rendezvous");
  return r;
}

template <typename F>
struct Launch {
  F kernel;
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args... args) const {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
      last_error = cudaErrorInvalidValue;  // what cudaGetLastError() reports for a bad configuration
      return;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block b;
          b.bar.reset(static_cast<int>(threads));
          b.warps = std::vector<Warp>((threads + 31) / 32);
          for (size_t w = 0; w < b.warps.size(); ++w)  // lanes past the block's end count as exited
            for (unsigned l = 0; l < 32; ++l)
              if (w * 32 + l >= threads) b.warps[w].exited |= 1u << l;
          block_ = &b;
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
              threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
              blockIdx = {bx, by, bz};
              blockDim = block;
              gridDim = grid;
              kernel(args...);
              Warp& w = b.warps[warp_id()];
              {
                std::lock_guard<std::mutex> lock(w.m);
                w.exited |= 1u << lane_id();
                w.cv.notify_all();
              }
              b.bar.exit();
            });
          for (auto& th : pool) th.join();
          block_ = nullptr;
        }
  }
};

template <typename F, typename G, typename B>
Launch<F> launch(F kernel, G grid, B block, size_t /*smem*/ = 0, cudaStream_t /*stream*/ = nullptr) {
  return Launch<F>{kernel, dim3(grid), dim3(block)};
}

}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

#define __syncthreads() ::emu::block_->bar.arrive_and_wait("__syncthreads never completed: divergent barrier")
#define __syncwarp(...) ((void)0)
template <typename T>
inline T __ldg(const T* p) { return *p; }
#define __shfl_xor_sync(mask, v, o, ...) \
  ::emu::exchange((mask), (v), [&](int l) { return l ^ (o); }, emu_width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_sync(mask, v, s, ...) \
  ::emu::exchange((mask), (v), [&](int l) { return l / emu_width_(__VA_ARGS__ + 0) * emu_width_(__VA_ARGS__ + 0) + ((s) % emu_width_(__VA_ARGS__ + 0)); }, emu_width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::emu::exchange((mask), (v), [&](int l) { return l + static_cast<int>(d); }, emu_width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::emu::exchange((mask), (v), [&](int l) { return l - static_cast<int>(d); }, emu_width_(__VA_ARGS__ + 0), __LINE__)
inline constexpr int emu_width_(int w) { return w == 0 ? 32 : w; }

// ---- bf16 / fp16 (storage types with the CUDA conversion functions rlhfv uses) ----
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline __half __float2half_rn(float f) {
  const _Float16 x = static_cast<_Float16>(f);  // IEEE round-to-nearest-even
  __half h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}
