// Fused CPU top-k over inner products (no pybind11 types, so it can be reused from C++).
#pragma once

#include <cstdint>
#include <string>

namespace fmrt {

enum class GalleryDType { kFloat32, kFloat16 };

// scores[q, :k] / indices[q, :k] receive the k largest dot(queries[q], gallery[n]) in
// descending order, ties broken by the lower index; NaN scores rank above everything (as in
// torch.topk). Requires 0 < k <= N. Inputs are C-contiguous; fp16 is IEEE binary16 bits.
// num_threads <= 0 uses the OpenMP default. Memory is O(threads * Q * k), independent of N.
void topk_ip_cpu(const float* queries, int64_t Q, int64_t D, const void* gallery,
                 GalleryDType gallery_dtype, int64_t N, int64_t k, float* scores,
                 int64_t* indices, int num_threads);

// Name of the kernel set in use ("avx2" or "generic").
std::string kernel_isa();
// Select a kernel set by name ("auto", "generic", "avx2"); returns false if unavailable.
bool set_kernel_isa(const std::string& name);
int default_num_threads();

}  // namespace fmrt
