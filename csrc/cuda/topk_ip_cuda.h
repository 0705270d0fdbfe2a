// CUDA top-k over inner products (host-side API; implementation in topk_ip.cu).
#pragma once

#include <cstdint>

namespace fmrt {
namespace cuda {

// Number of visible CUDA devices (0 when there is no driver or device).
int device_count();

// Same contract as fmrt::topk_ip_cpu; all pointers are host memory (copied per call).
// `gallery` holds float32, or IEEE binary16 bits when gallery_half. Requires N < 2^32.
// Throws std::runtime_error on CUDA errors.
void topk_ip(const float* queries, int64_t Q, int64_t D, const void* gallery, bool gallery_half,
             int64_t N, int64_t k, float* scores, int64_t* indices, int device);

}  // namespace cuda
}  // namespace fmrt
