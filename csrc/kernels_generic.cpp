// Baseline build of the kernels: plain target flags (SSE2 on x86-64, NEON on AArch64).
#define FMRT_KERNEL_NS generic
#define FMRT_KERNEL_NAME "generic"
#define FMRT_VW 4
#if defined(__aarch64__)
#define FMRT_MR 6  // 32 vector registers
#else
#define FMRT_MR 2  // 16 registers, and a 4-wide vf costs one register each only with SSE
#endif
#define FMRT_USE_F16C 0
#include "kernels_impl.inc"

namespace fmrt {
const KernelTable& generic_kernels() { return generic::table(); }
}  // namespace fmrt
