// AVX2 + FMA + F16C build of the kernels; this file alone is compiled with -mavx2 -mfma -mf16c
// and is only called after a runtime CPU check, so the module still loads on older x86 CPUs.
#define FMRT_KERNEL_NS avx2
#define FMRT_KERNEL_NAME "avx2"
#define FMRT_VW 8
#define FMRT_MR 6  // 6x2 accumulators + 2 panel loads + 1 broadcast fit in 16 ymm registers
#define FMRT_USE_F16C 1
#include "kernels_impl.inc"

namespace fmrt {
const KernelTable& avx2_kernels() { return avx2::table(); }
}  // namespace fmrt
