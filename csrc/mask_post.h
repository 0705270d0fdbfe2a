// SAM mask post-processing on the CPU (no pybind11 types, so it can be reused from C++).
//
// Semantics are segment-anything 1.0's (segment_anything/utils/amg.py) and torchvision's
// batched_nms, bit for bit:
//   * a pixel is "on" when logit > threshold (strict, float32 compare; NaN is off);
//   * stability = float(#(x > thr_hi)) / float(#(x > thr_lo)), a float32 division like
//     calculate_stability_score's int32 / int32 (0/0 -> NaN, n/0 -> inf);
//   * boxes are XYXY int64 with inclusive max (batched_mask_to_box), [0,0,0,0] for an empty mask;
//   * RLE is COCO's uncompressed form: column-major (Fortran) order, the first count is the
//     length of the leading zero run (0 when the first pixel is on), like mask_to_rle_pytorch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fmrt {
namespace maskpost {

// Output frame of the RLE (amg.uncrop_masks + mask_to_rle_pytorch without materialising the
// padded mask): the [H, W] crop mask sits at rows [y0, y0+H), columns [x0, x0+W) of an
// [out_h, out_w] zero frame. The identity frame is {0, 0, H, W}.
struct RleFrame {
  int64_t x0 = 0, y0 = 0, out_h = 0, out_w = 0;
};

// Per-mask results. rle_counts[i] is filled only when want_rle.
struct MaskStatsResult {
  std::vector<int64_t> count_hi, count_lo, area;  // [N]
  std::vector<float> stability;                   // [N]
  std::vector<int64_t> boxes;                     // [N * 4]  x0, y0, x1, y1 (inclusive)
  std::vector<std::vector<uint32_t>> rle_counts;  // [N][runs]
};

// One pass over each [H, W] float32 mask of `logits` (C-contiguous masks of H * W floats):
// threshold, stability counts, box and (optionally) RLE. Result n describes mask indices[n]
// (mask n when indices is null), so a filtered subset costs no gather copy. Masks are spread
// over OpenMP threads; num_threads <= 0 uses the OpenMP default. Requires H, W >= 1 and, with
// want_rle, out_h * out_w < 2^32 (pycocotools stores counts as uint32).
void mask_stats(const float* logits, const int64_t* indices, int64_t N, int64_t H, int64_t W,
                float threshold, float thr_hi, float thr_lo, bool want_rle, const RleFrame& frame,
                int num_threads, MaskStatsResult* out);

// RLE (and area / box if wanted) from bit-packed thresholded masks, e.g. computed on a GPU:
// mask n, row i, column j is bit (j % 64) of bits[(n * H + i) * words_per_row + j / 64]
// (words_per_row >= ceil(W / 64); little-endian uint64 words). Fills out->rle_counts only.
void rle_from_bits(const uint64_t* bits, int64_t N, int64_t H, int64_t W, int64_t words_per_row,
                   const RleFrame& frame, int num_threads, MaskStatsResult* out);

// pycocotools' compressed RLE string (maskApi.c rleToString: LEB128-like, 5 bits per char,
// chars 48..111, counts after the third delta-coded against the count two before).
std::string rle_to_string(const uint32_t* counts, int64_t m);
// Inverse of rle_to_string (maskApi.c rleFrString). Throws std::invalid_argument on a
// malformed string.
std::vector<uint32_t> rle_from_string(const std::string& s);

// Decodes uncompressed counts into a C-order [H, W] uint8 mask (0/1). Throws
// std::invalid_argument when the counts do not sum to H * W.
void rle_decode(const uint32_t* counts, int64_t m, int64_t H, int64_t W, uint8_t* mask);

// torchvision.ops.batched_nms: greedy NMS within each class of `idxs`, boxes XYXY
// ([N, 4], float or double), IoU computed in the box dtype exactly as torchvision's CPU kernel,
// suppression when IoU > iou_threshold (in double). Scores are only ordered, so any float
// dtype widened to double ranks the same. Returns kept indices ordered by descending score (a
// stable sort: ties keep index order; NaN scores first, as torch.sort). Instantiated for
// float and double.
template <typename T>
std::vector<int64_t> batched_nms(const T* boxes, const double* scores, const int64_t* idxs,
                                 int64_t N, double iou_threshold, int num_threads);

}  // namespace maskpost
}  // namespace fmrt
