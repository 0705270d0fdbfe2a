// CUDA top-k over inner products: a simple, exact two-pass reference implementation.
//   1. scores[q, n] = dot(q, g_n)            (one warp per gallery row, coalesced over D)
//   2. per query (one block): radix-select the k smallest 64-bit keys
//        key = (~ordered(score) << 32) | n
//      so "smaller key" means higher score, ties -> lower index, all keys unique; then a
//      segmented radix sort orders the k keys and the scores are gathered back.
// Scores are materialised for a chunk of queries at a time (bounded scratch), which keeps
// this short and obviously correct rather than optimal.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "topk_ip_cuda.h"

namespace fmrt {
namespace cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fmrt CUDA top-k: ") + what + ": " + cudaGetErrorString(err));
}

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DevicePtr = std::unique_ptr<void, DeviceFree>;

DevicePtr device_alloc(size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, std::max<size_t>(bytes, 1)), "cudaMalloc");
  return DevicePtr(p);
}

template <typename T>
T* ptr(const DevicePtr& p) {
  return static_cast<T*>(p.get());
}

// Restores the caller's current device and owns a stream.
struct DeviceScope {
  int prev = 0;
  cudaStream_t stream = nullptr;
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~DeviceScope() {
    if (stream) cudaStreamDestroy(stream);
    cudaSetDevice(prev);
  }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

constexpr int kWarps = 8;

template <typename G>
__global__ void scores_kernel(const float* __restrict__ q, const G* __restrict__ g, int64_t N,
                              int64_t D, float* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float* qrow = q + int64_t(blockIdx.y) * D;
  float* out = scores + int64_t(blockIdx.y) * N;
  for (int64_t n = int64_t(blockIdx.x) * kWarps + warp; n < N; n += int64_t(gridDim.x) * kWarps) {
    const G* grow = g + n * D;
    float acc = 0.f;
    for (int64_t d = lane; d < D; d += 32) acc += __ldg(qrow + d) * to_float(grow[d]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[n] = acc;
  }
}

// Monotone map float -> uint32 (NaN above +inf, -0 == +0), matching the CPU ordering.
__device__ __forceinline__ uint32_t ordered(float f) {
  if (isnan(f)) return 0xffffffffu;
  uint32_t b = __float_as_uint(f);
  if (f == 0.f) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t make_key(float s, int64_t n) {
  return (uint64_t(~ordered(s)) << 32) | uint64_t(n);
}

constexpr int kSelectThreads = 256;

// One block per query: writes the k smallest keys of the row (unordered) to keys[q*k ...].
__global__ void select_kernel(const float* __restrict__ scores, int64_t N, int64_t k,
                              uint64_t* __restrict__ keys) {
  __shared__ unsigned int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_remaining;
  __shared__ int s_exact;
  __shared__ unsigned int s_count;

  const float* row = scores + int64_t(blockIdx.x) * N;
  uint64_t prefix = 0;   // resolved high digits of the k-th key
  int64_t remaining = k;  // how many keys still to take among those matching `prefix`
  int shift = 0;          // bits below `shift` are unresolved
  for (int pass = 0; pass < 8; ++pass) {
    const int digit_shift = 56 - 8 * pass;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const uint64_t key = make_key(row[n], n);
      if (pass == 0 || (key >> (digit_shift + 8)) == (prefix >> (digit_shift + 8)))
        atomicAdd(&hist[(key >> digit_shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t cum = 0;
      int b = 0;
      for (; b < 255; ++b) {
        if (cum + int64_t(hist[b]) >= remaining) break;
        cum += hist[b];
      }
      s_prefix = prefix | (uint64_t(b) << digit_shift);
      s_remaining = remaining - cum;
      s_exact = int64_t(hist[b]) == remaining - cum;  // take the whole bin: done
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    shift = digit_shift;
    const bool exact = s_exact != 0;
    __syncthreads();  // everyone has read the shared values before they are overwritten
    if (exact) break;  // keys are unique, so this always happens by the last pass
  }

  // Exactly k keys satisfy (key >> shift) <= (prefix >> shift).
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  const uint64_t bound = prefix >> shift;
  uint64_t* out = keys + int64_t(blockIdx.x) * k;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const uint64_t key = make_key(row[n], n);
    if ((key >> shift) <= bound) {
      const unsigned int pos = atomicAdd(&s_count, 1u);
      if (pos < k) out[pos] = key;
    }
  }
}

__global__ void offsets_kernel(int* offsets, int nseg, int k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= nseg) offsets[i] = i * k;
}

__global__ void decode_kernel(const uint64_t* __restrict__ keys, const float* __restrict__ scores,
                              int64_t N, int64_t k, int64_t total, float* __restrict__ out_s,
                              int64_t* __restrict__ out_i) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t q = i / k;
  const int64_t n = int64_t(keys[i] & 0xffffffffull);
  out_i[i] = n;
  out_s[i] = scores[q * N + n];  // original value (keeps -0.0 and NaN payloads)
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver/device" error
    return 0;
  }
  return n;
}

void topk_ip(const float* queries, int64_t Q, int64_t D, const void* gallery, bool gallery_half,
             int64_t N, int64_t k, float* scores_out, int64_t* indices_out, int device) {
  if (Q <= 0 || N <= 0 || k <= 0) return;
  if (N >= (int64_t(1) << 32)) throw std::runtime_error("fmrt CUDA top-k: N must be < 2^32");
  k = std::min(k, N);
  DeviceScope scope(device);
  cudaStream_t st = scope.stream;

  const size_t gbytes = size_t(N) * size_t(D) * (gallery_half ? 2 : 4);
  DevicePtr d_g = device_alloc(gbytes);
  check(cudaMemcpyAsync(d_g.get(), gallery, gbytes, cudaMemcpyHostToDevice, st), "copy gallery");

  // Queries per chunk: keep the score matrix under ~256 MiB and the segment count in int range.
  const int64_t max_scores = (int64_t(256) << 20) / 4;
  int64_t qb = std::max<int64_t>(1, std::min<int64_t>(Q, max_scores / N));
  qb = std::min<int64_t>(qb, 65535);  // gridDim.y limit
  qb = std::max<int64_t>(1, std::min<int64_t>(qb, (int64_t(1) << 30) / k));

  DevicePtr d_q = device_alloc(size_t(qb * D) * 4);
  DevicePtr d_scores = device_alloc(size_t(qb * N) * 4);
  DevicePtr d_keys = device_alloc(size_t(qb * k) * 8);
  DevicePtr d_keys_sorted = device_alloc(size_t(qb * k) * 8);
  DevicePtr d_offsets = device_alloc(size_t(qb + 1) * 4);
  DevicePtr d_out_s = device_alloc(size_t(qb * k) * 4);
  DevicePtr d_out_i = device_alloc(size_t(qb * k) * 8);

  size_t temp_bytes = 0;
  check(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, temp_bytes, ptr<uint64_t>(d_keys),
                                                ptr<uint64_t>(d_keys_sorted), int(qb * k), int(qb),
                                                ptr<int>(d_offsets), ptr<int>(d_offsets) + 1, 0, 64, st),
        "sort (size query)");
  DevicePtr d_temp = device_alloc(temp_bytes);

  for (int64_t q0 = 0; q0 < Q; q0 += qb) {
    const int64_t nq = std::min(qb, Q - q0);
    const int64_t total = nq * k;
    check(cudaMemcpyAsync(d_q.get(), queries + q0 * D, size_t(nq * D) * 4, cudaMemcpyHostToDevice, st),
          "copy queries");

    const dim3 sgrid(unsigned(std::min<int64_t>((N + kWarps - 1) / kWarps, 65535)), unsigned(nq));
    if (gallery_half)
      scores_kernel<__half><<<sgrid, kWarps * 32, 0, st>>>(ptr<float>(d_q), ptr<__half>(d_g), N, D,
                                                          ptr<float>(d_scores));
    else
      scores_kernel<float><<<sgrid, kWarps * 32, 0, st>>>(ptr<float>(d_q), ptr<float>(d_g), N, D,
                                                         ptr<float>(d_scores));
    check(cudaGetLastError(), "scores kernel");

    select_kernel<<<unsigned(nq), kSelectThreads, 0, st>>>(ptr<float>(d_scores), N, k, ptr<uint64_t>(d_keys));
    check(cudaGetLastError(), "select kernel");

    offsets_kernel<<<unsigned((nq + 1 + 255) / 256), 256, 0, st>>>(ptr<int>(d_offsets), int(nq), int(k));
    check(cudaGetLastError(), "offsets kernel");

    size_t bytes = temp_bytes;
    check(cub::DeviceSegmentedRadixSort::SortKeys(d_temp.get(), bytes, ptr<uint64_t>(d_keys),
                                                  ptr<uint64_t>(d_keys_sorted), int(total), int(nq),
                                                  ptr<int>(d_offsets), ptr<int>(d_offsets) + 1, 0, 64, st),
          "sort");

    decode_kernel<<<unsigned((total + 255) / 256), 256, 0, st>>>(
        ptr<uint64_t>(d_keys_sorted), ptr<float>(d_scores), N, k, total, ptr<float>(d_out_s),
        ptr<int64_t>(d_out_i));
    check(cudaGetLastError(), "decode kernel");

    check(cudaMemcpyAsync(scores_out + q0 * k, d_out_s.get(), size_t(total) * 4, cudaMemcpyDeviceToHost, st),
          "copy scores");
    check(cudaMemcpyAsync(indices_out + q0 * k, d_out_i.get(), size_t(total) * 8, cudaMemcpyDeviceToHost, st),
          "copy indices");
    check(cudaStreamSynchronize(st), "synchronize");
  }
}

}  // namespace cuda
}  // namespace fmrt
