// Inner-product kernels for the CPU top-k, compiled once per ISA (see kernels_impl.inc).
#pragma once

#include <cstdint>

namespace fmrt {

// Packed gallery blocks are stored panel-major: panels of kPanel rows, each panel laid out
// as [D][kPanel] so the GEMM micro-kernel reads kPanel consecutive rows with one vector load.
constexpr int kPanel = 16;

struct KernelTable {
  const char* name;
  // Pack `rows` gallery rows (row stride ldg) into panel-major layout; the last panel is
  // zero-padded to kPanel rows. dst needs ceil(rows / kPanel) * kPanel * D floats.
  void (*pack_f32)(const float* g, int64_t ldg, int rows, int D, float* dst);
  void (*pack_f16)(const uint16_t* g, int64_t ldg, int rows, int D, float* dst);
  // IEEE binary16 -> binary32 for n contiguous values.
  void (*cvt_f16)(const uint16_t* src, int64_t n, float* dst);
  // out[i * ldo + j] = dot(q_i, row_j) for i < nq, j < rows, gallery given packed.
  void (*gemm_packed)(const float* q, int64_t ldq, int nq, const float* packed, int rows, int D,
                      float* out, int64_t ldo);
  // Same, gallery given row-major (used for few queries, where packing does not pay off).
  void (*dot_rows)(const float* q, int64_t ldq, int nq, const float* g, int64_t ldg, int rows,
                   int D, float* out, int64_t ldo);
};

const KernelTable& generic_kernels();
#if defined(FMRT_HAVE_AVX2_KERNELS)
const KernelTable& avx2_kernels();
#endif

}  // namespace fmrt
