// CUDA SAM mask statistics (host-side API; implementation in mask_post.cu).
#pragma once

#include <cstdint>

namespace fmrt {
namespace cuda {

// Same per-mask semantics as fmrt::maskpost::mask_stats (see ../mask_post.h), on device memory:
//   logits     float32 [N, H, W], C-contiguous
//   counts     int64 [N, 3]: #(x > thr_hi), #(x > thr_lo), #(x > threshold)
//   boxes      int64 [N, 4]: XYXY with inclusive max, [0, 0, 0, 0] for an empty mask
//   stability  float32 [N]: float(counts[:, 0]) / float(counts[:, 1])
//   bits       uint64 [N, H, words_per_row] or nullptr: bit (j % 64) of word j / 64 of row i is
//              (x[i, j] > threshold); padding bits are zero. The CPU turns it into COCO RLE
//              (fmrt::maskpost::rle_from_bits), moving 1/32 of the logits' bytes.
// Asynchronous on `stream` (a cudaStream_t; nullptr is the legacy default stream); every
// output is fully written (no zero-initialisation needed). Throws std::runtime_error on
// launch errors. Requires N < 2^31, H < 2^31, W < 2^31.
void mask_stats(const float* logits, int64_t N, int64_t H, int64_t W, float threshold,
                float thr_hi, float thr_lo, int64_t* counts, int64_t* boxes, float* stability,
                uint64_t* bits, int64_t words_per_row, void* stream);

}  // namespace cuda
}  // namespace fmrt
