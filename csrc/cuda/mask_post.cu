// CUDA SAM mask statistics: threshold + stability counts + box (+ bit-packed mask for the CPU
// RLE) in one read of the logits. See mask_post_cuda.h for the contract.
//
// Layout: grid.x = masks, grid.y = row chunks of one mask (so a few large masks still fill the
// GPU: ~4 blocks per SM in total). Each warp takes whole rows and walks them 32 columns at a
// time: coalesced 128-byte loads, one __ballot_sync gives the 32 threshold bits of those
// columns (written as one uint32 word, i.e. half of a little-endian uint64 word of the row),
// per-thread counters and box extremes are reduced per block (warp shuffles + shared memory)
// and merged across blocks with one 64-bit atomic per quantity. A 1024x1024 mask is 4 MiB of
// logits but only 128 KiB of bits, so the device -> host copy for the RLE is 32x smaller.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mask_post_cuda.h"

namespace fmrt {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fmrt CUDA mask_stats: ") + what + ": " +
                             cudaGetErrorString(err));
}

// counts := 0, boxes := (W, H, -1, -1) so atomicMin / atomicMax can merge blocks.
__global__ void init_kernel(int64_t N, int64_t H, int64_t W, int64_t* counts, int64_t* boxes) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  counts[n * 3 + 0] = 0;
  counts[n * 3 + 1] = 0;
  counts[n * 3 + 2] = 0;
  boxes[n * 4 + 0] = W;
  boxes[n * 4 + 1] = H;
  boxes[n * 4 + 2] = -1;
  boxes[n * 4 + 3] = -1;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_min(int v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_max(int v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void __launch_bounds__(kThreads)
stats_kernel(const float* __restrict__ logits, int H, int W, float t, float thi, float tlo,
             int64_t* __restrict__ counts, int64_t* __restrict__ boxes,
             uint32_t* __restrict__ bits32, int64_t words32_per_row, int64_t cols_padded) {
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = (H + int(gridDim.y) - 1) / int(gridDim.y);
  const int r0 = int(blockIdx.y) * chunk, r1 = min(H, r0 + chunk);
  const float* m = logits + n * int64_t(H) * int64_t(W);

  unsigned long long hi = 0, lo = 0, area = 0;
  int xmin = INT_MAX, xmax = -1, ymin = INT_MAX, ymax = -1;
  for (int r = r0 + warp; r < r1; r += kWarps) {
    const float* row = m + int64_t(r) * W;
    uint32_t* brow = bits32 ? bits32 + (n * H + r) * words32_per_row : nullptr;
    for (int64_t c0 = 0; c0 < cols_padded; c0 += 32) {
      const int64_t c = c0 + lane;
      // Out-of-range columns read as NaN: every compare is false, as for NaN logits in torch.
      const float v = c < W ? __ldg(row + c) : __int_as_float(0x7fc00000);
      const bool on = v > t;
      hi += v > thi;
      lo += v > tlo;
      const unsigned ballot = __ballot_sync(0xffffffffu, on);
      if (on) {
        xmin = min(xmin, int(c));
        xmax = max(xmax, int(c));
      }
      if (ballot) {
        ymin = min(ymin, r);
        ymax = max(ymax, r);
      }
      if (lane == 0) {
        area += __popc(ballot);
        if (brow) brow[c0 >> 5] = ballot;
      }
    }
  }

  __shared__ unsigned long long s_cnt[3][kWarps];
  __shared__ int s_box[4][kWarps];
  hi = warp_sum(hi);
  lo = warp_sum(lo);
  area = warp_sum(area);
  xmin = warp_min(xmin);
  ymin = warp_min(ymin);
  xmax = warp_max(xmax);
  ymax = warp_max(ymax);
  if (lane == 0) {
    s_cnt[0][warp] = hi;
    s_cnt[1][warp] = lo;
    s_cnt[2][warp] = area;
    s_box[0][warp] = xmin;
    s_box[1][warp] = ymin;
    s_box[2][warp] = xmax;
    s_box[3][warp] = ymax;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      hi += s_cnt[0][w];
      lo += s_cnt[1][w];
      area += s_cnt[2][w];
      xmin = min(xmin, s_box[0][w]);
      ymin = min(ymin, s_box[1][w]);
      xmax = max(xmax, s_box[2][w]);
      ymax = max(ymax, s_box[3][w]);
    }
    unsigned long long* cnt = reinterpret_cast<unsigned long long*>(counts + n * 3);
    if (hi) atomicAdd(cnt + 0, hi);
    if (lo) atomicAdd(cnt + 1, lo);
    if (area) atomicAdd(cnt + 2, area);
    if (xmax >= 0) {
      long long* box = reinterpret_cast<long long*>(boxes + n * 4);
      atomicMin(box + 0, (long long)xmin);
      atomicMin(box + 1, (long long)ymin);
      atomicMax(box + 2, (long long)xmax);
      atomicMax(box + 3, (long long)ymax);
    }
  }
}

// stability = float(hi) / float(lo) (torch's int32 / int32 true division is a float32 division
// of the exactly converted counts); empty masks get the [0, 0, 0, 0] box of batched_mask_to_box.
__global__ void finalize_kernel(int64_t N, const int64_t* counts, int64_t* boxes,
                                float* stability) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  stability[n] = __fdiv_rn(float(counts[n * 3 + 0]), float(counts[n * 3 + 1]));
  if (boxes[n * 4 + 2] < 0) {
    boxes[n * 4 + 0] = 0;
    boxes[n * 4 + 1] = 0;
    boxes[n * 4 + 2] = 0;
    boxes[n * 4 + 3] = 0;
  }
}

}  // namespace

void mask_stats(const float* logits, int64_t N, int64_t H, int64_t W, float threshold,
                float thr_hi, float thr_lo, int64_t* counts, int64_t* boxes, float* stability,
                uint64_t* bits, int64_t words_per_row, void* stream_ptr) {
  if (N <= 0) return;
  if (N > INT_MAX || H > INT_MAX || W > INT_MAX || H < 1 || W < 1)
    throw std::invalid_argument("fmrt CUDA mask_stats: need 1 <= H, W and N, H, W < 2^31");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t target_blocks = 4 * int64_t(std::max(sms, 1));
  const int64_t max_chunks = (H + kWarps - 1) / kWarps;  // at least one row per warp
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({max_chunks, (target_blocks + N - 1) / N, 65535}));
  const int64_t words32 = bits ? 2 * words_per_row : 0;
  const int64_t cols_padded = bits ? 64 * words_per_row : (W + 31) / 32 * 32;

  const int small_blocks = int((N + 255) / 256);
  init_kernel<<<small_blocks, 256, 0, stream>>>(N, H, W, counts, boxes);
  check(cudaGetLastError(), "init launch");
  stats_kernel<<<dim3(unsigned(N), unsigned(chunks)), kThreads, 0, stream>>>(
      logits, int(H), int(W), threshold, thr_hi, thr_lo, counts, boxes,
      reinterpret_cast<uint32_t*>(bits), words32, cols_padded);
  check(cudaGetLastError(), "stats launch");
  finalize_kernel<<<small_blocks, 256, 0, stream>>>(N, counts, boxes, stability);
  check(cudaGetLastError(), "finalize launch");
}

}  // namespace cuda
}  // namespace fmrt
