// SAM mask post-processing on the CPU: one pass per mask for threshold + stability + box + RLE,
// pycocotools' RLE strings, and torchvision-exact batched NMS. See mask_post.h for the contract.
//
// Why one pass: the amg.py reference reads each 1024x1024 float32 mask (4 MiB) about eight
// times (two stability thresholds, the binary threshold, max/min reductions for the box, a
// transposed copy, XOR and nonzero for the RLE) and then filters change indices per mask in a
// Python loop. Here every float is loaded once, compared against the three thresholds in
// registers, and only one bit per pixel survives the row: the box and the RLE are derived from
// 64-bit words (16 words per 1024-pixel row), so RLE costs ~1 XOR per 64 pixels plus one step per
// run boundary.
#include "mask_post.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FMRT_MASK_POST_X86 1
#include <immintrin.h>
#endif

#include "topk_ip.h"  // kernel_isa(): the same switch selects generic vs AVX2 code here

namespace fmrt {
namespace maskpost {
namespace {

inline int ctz64(uint64_t x) { return __builtin_ctzll(x); }
inline int clz64(uint64_t x) { return __builtin_clzll(x); }

int resolve_threads(int num_threads, int64_t work_items) {
#if defined(_OPENMP)
  const int t = num_threads > 0 ? num_threads : omp_get_max_threads();
  return int(std::max<int64_t>(1, std::min<int64_t>(t, work_items)));
#else
  (void)num_threads;
  (void)work_items;
  return 1;
#endif
}

// ------------------------------------------------------------------ one row, three thresholds
// Writes bit j of words[j / 64] = (x[j] > t) for j < W (bits past W are zero) and adds
// #(x > t_hi), #(x > t_lo) to *hi, *lo. NaN compares false everywhere, as in torch.
void row_generic(const float* x, int64_t W, float t, float thi, float tlo, uint64_t* words,
                 int64_t* hi, int64_t* lo) {
  int64_t h = 0, l = 0;
  for (int64_t k = 0; k < W; k += 64) {
    const int n = int(std::min<int64_t>(64, W - k));
    uint64_t w = 0;
    for (int b = 0; b < n; ++b) {
      const float v = x[k + b];
      w |= uint64_t(v > t) << b;
      h += v > thi;
      l += v > tlo;
    }
    words[k >> 6] = w;
  }
  *hi += h;
  *lo += l;
}

#if defined(FMRT_MASK_POST_X86)
// 8 floats per step: 3 compares, 1 movemask for the bits, and the hi/lo counts accumulated as
// int32 lanes (a true compare is -1, so subtracting it counts). Lanes see at most W/8 hits, so
// int32 cannot overflow for any W < 2^34.
__attribute__((target("avx2"))) void row_avx2(const float* x, int64_t W, float t, float thi,
                                              float tlo, uint64_t* words, int64_t* hi,
                                              int64_t* lo) {
  const __m256 vt = _mm256_set1_ps(t), vhi = _mm256_set1_ps(thi), vlo = _mm256_set1_ps(tlo);
  __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 64 <= W; k += 64) {
    uint64_t w = 0;
    for (int b = 0; b < 64; b += 8) {
      const __m256 v = _mm256_loadu_ps(x + k + b);
      w |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ)))) << b;
      acc_hi = _mm256_sub_epi32(acc_hi, _mm256_castps_si256(_mm256_cmp_ps(v, vhi, _CMP_GT_OQ)));
      acc_lo = _mm256_sub_epi32(acc_lo, _mm256_castps_si256(_mm256_cmp_ps(v, vlo, _CMP_GT_OQ)));
    }
    words[k >> 6] = w;
  }
  alignas(32) int32_t lanes_hi[8], lanes_lo[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes_hi), acc_hi);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes_lo), acc_lo);
  int64_t h = 0, l = 0;
  for (int i = 0; i < 8; ++i) {
    h += lanes_hi[i];
    l += lanes_lo[i];
  }
  *hi += h;
  *lo += l;
  if (k < W) row_generic(x + k, W - k, t, thi, tlo, words + (k >> 6), hi, lo);
}
#endif

using RowFn = void (*)(const float*, int64_t, float, float, float, uint64_t*, int64_t*, int64_t*);

RowFn pick_row_fn() {
#if defined(FMRT_MASK_POST_X86)
  if (kernel_isa() == "avx2") return row_avx2;  // kernel_isa() already checked the CPU
#endif
  return row_generic;
}

// ------------------------------------------------------------------ RLE from row bit-words
// Rows arrive top to bottom. A change inside column j between rows i-1 and i is recorded as
// (j, i); afterwards a counting sort by column yields the column-major (Fortran) order that
// COCO RLE needs, without transposing the mask. Column boundaries (bottom of column j-1 vs
// top of column j) and the zero frame of uncrop_masks are resolved in finish().
class RleBuilder {
 public:
  void begin(int64_t H, int64_t W) {
    H_ = H;
    W_ = W;
    nw_ = (W + 63) >> 6;
    first_.assign(size_t(nw_), 0);
    prev_.assign(size_t(nw_), 0);
    colcnt_.assign(size_t(W) + 1, 0);
    pair_col_.clear();
    pair_row_.clear();
  }

  void add_row(int64_t i, const uint64_t* words) {
    if (i == 0) {
      std::copy(words, words + nw_, first_.begin());
      std::copy(words, words + nw_, prev_.begin());
      return;
    }
    for (int64_t w = 0; w < nw_; ++w) {
      uint64_t d = words[w] ^ prev_[size_t(w)];
      prev_[size_t(w)] = words[w];
      while (d) {
        const uint32_t j = uint32_t((w << 6) + ctz64(d));
        d &= d - 1;
        pair_col_.push_back(j);
        pair_row_.push_back(uint32_t(i));
        ++colcnt_[j];
      }
    }
  }

  // Emits the counts of the mask placed in `frame` (identity frame when out_h == 0).
  void finish(const RleFrame& frame_in, std::vector<uint32_t>* counts) {
    RleFrame f = frame_in;
    if (f.out_h == 0 && f.out_w == 0) f = RleFrame{0, 0, H_, W_};
    const std::vector<uint64_t>& last = prev_;
    // Counting sort of the intra-column changes by column (rows stay ascending: stable).
    std::vector<uint32_t>& start = start_;
    start.assign(size_t(W_) + 1, 0);
    for (int64_t j = 0; j < W_; ++j) start[size_t(j) + 1] = start[size_t(j)] + colcnt_[size_t(j)];
    sorted_rows_.resize(pair_row_.size());
    cursor_.assign(start.begin(), start.end() - 1);
    for (size_t p = 0; p < pair_row_.size(); ++p) sorted_rows_[cursor_[pair_col_[p]]++] = pair_row_[p];

    auto bit = [](const std::vector<uint64_t>& r, int64_t j) -> int {
      return int((r[size_t(j >> 6)] >> (j & 63)) & 1u);
    };
    const int64_t OH = f.out_h, OW = f.out_w, x0 = f.x0, y0 = f.y0;
    const bool top_full = y0 == 0, bottom_full = y0 + H_ == OH;
    counts->clear();
    counts->reserve(pair_row_.size() + 2 * size_t(W_) + 2);
    uint64_t lastpos = 0;
    auto emit = [&](uint64_t pos) {
      counts->push_back(uint32_t(pos - lastpos));
      lastpos = pos;
    };
    auto inside = [&](int64_t c) { return c >= x0 && c < x0 + W_; };
    const int first_value = (inside(0) && top_full) ? bit(first_, -x0) : 0;
    if (first_value) counts->push_back(0);  // COCO RLE always starts with a zero run
    int prev_bottom = 0;
    // Columns left and right of the crop are all zero: only the crop's columns and the two
    // columns that border it can hold a change.
    const int64_t c_begin = std::max<int64_t>(0, x0), c_end = std::min<int64_t>(OW, x0 + W_ + 1);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const uint64_t base = uint64_t(c) * uint64_t(OH);
      if (!inside(c)) {  // the column right after the crop
        if (c > 0 && prev_bottom) emit(base);
        break;
      }
      const int64_t j = c - x0;
      const int top = top_full ? bit(first_, j) : 0;
      if (c > 0 && top != prev_bottom) emit(base);
      if (!top_full && bit(first_, j)) emit(base + uint64_t(y0));
      for (uint32_t p = start[size_t(j)]; p < start[size_t(j) + 1]; ++p)
        emit(base + uint64_t(y0) + sorted_rows_[p]);
      if (!bottom_full && bit(last, j)) emit(base + uint64_t(y0 + H_));
      prev_bottom = bottom_full ? bit(last, j) : 0;
    }
    counts->push_back(uint32_t(uint64_t(OH) * uint64_t(OW) - lastpos));
  }

 private:
  int64_t H_ = 0, W_ = 0, nw_ = 0;
  std::vector<uint64_t> first_, prev_;
  std::vector<uint32_t> colcnt_, pair_col_, pair_row_, start_, cursor_, sorted_rows_;
};

void check_frame(const RleFrame& f, int64_t H, int64_t W) {
  if (f.out_h == 0 && f.out_w == 0) return;
  if (f.x0 < 0 || f.y0 < 0 || f.x0 + W > f.out_w || f.y0 + H > f.out_h)
    throw std::invalid_argument("RLE frame: the [" + std::to_string(H) + ", " + std::to_string(W) +
                                "] mask at (x0=" + std::to_string(f.x0) + ", y0=" +
                                std::to_string(f.y0) + ") does not fit in [" +
                                std::to_string(f.out_h) + ", " + std::to_string(f.out_w) + "]");
}

void check_rle_size(const RleFrame& f, int64_t H, int64_t W) {
  const int64_t oh = f.out_h ? f.out_h : H, ow = f.out_w ? f.out_w : W;
  if (double(oh) * double(ow) >= 4294967296.0)
    throw std::invalid_argument("RLE needs H * W < 2^32 (pycocotools stores uint32 counts)");
}

// Runs body(n, tid) for n in [0, N) over OpenMP threads, rethrowing the first exception.
template <typename F>
void parallel_masks(int64_t N, int T, F&& body) {
  std::exception_ptr error;
#if defined(_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
#if defined(_OPENMP)
    const int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
#else
    const int tid = 0;
#endif
    for (int64_t n = 0; n < N; ++n) {
      try {
        body(n, tid);
      } catch (...) {  // exceptions must not escape an OpenMP region
#if defined(_OPENMP)
#pragma omp critical(fmrt_mask_post_error)
#endif
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

// ------------------------------------------------------------------ public: stats
void mask_stats(const float* logits, const int64_t* indices, int64_t N, int64_t H, int64_t W,
                float threshold, float thr_hi, float thr_lo, bool want_rle, const RleFrame& frame,
                int num_threads, MaskStatsResult* out) {
  if (H < 1 || W < 1) throw std::invalid_argument("mask_stats needs H >= 1 and W >= 1");
  if (want_rle) {
    check_frame(frame, H, W);
    check_rle_size(frame, H, W);
  }
  out->count_hi.assign(size_t(N), 0);
  out->count_lo.assign(size_t(N), 0);
  out->area.assign(size_t(N), 0);
  out->stability.assign(size_t(N), 0.f);
  out->boxes.assign(size_t(N) * 4, 0);
  out->rle_counts.clear();
  if (want_rle) out->rle_counts.resize(size_t(N));
  if (N == 0) return;

  const RowFn row_fn = pick_row_fn();
  const int T = resolve_threads(num_threads, N);
  const int64_t nw = (W + 63) >> 6;
  std::vector<RleBuilder> builders(static_cast<size_t>(want_rle ? T : 0));
  std::vector<std::vector<uint64_t>> row_words(static_cast<size_t>(T)), col_any(static_cast<size_t>(T));

  parallel_masks(N, T, [&](int64_t n, int tid) {
    std::vector<uint64_t>& words = row_words[size_t(tid)];
    std::vector<uint64_t>& cols = col_any[size_t(tid)];
    words.assign(size_t(nw), 0);
    cols.assign(size_t(nw), 0);
    RleBuilder* rb = want_rle ? &builders[size_t(tid)] : nullptr;
    if (rb) rb->begin(H, W);
    const float* m = logits + (indices ? indices[n] : n) * H * W;
    int64_t hi = 0, lo = 0, area = 0, top = -1, bottom = -1;
    for (int64_t i = 0; i < H; ++i) {
      row_fn(m + i * W, W, threshold, thr_hi, thr_lo, words.data(), &hi, &lo);
      uint64_t any = 0;
      for (int64_t w = 0; w < nw; ++w) {
        any |= words[size_t(w)];
        cols[size_t(w)] |= words[size_t(w)];
        area += __builtin_popcountll(words[size_t(w)]);
      }
      if (any) {
        if (top < 0) top = i;
        bottom = i;
      }
      if (rb) rb->add_row(i, words.data());
    }
    out->count_hi[size_t(n)] = hi;
    out->count_lo[size_t(n)] = lo;
    out->area[size_t(n)] = area;
    // float32 division of the exact counts, as torch's int32 / int32 true division.
    out->stability[size_t(n)] = float(hi) / float(lo);
    int64_t* box = out->boxes.data() + n * 4;
    if (top >= 0) {
      int64_t left = -1, right = -1;
      for (int64_t w = 0; w < nw; ++w)
        if (cols[size_t(w)]) {
          left = (w << 6) + ctz64(cols[size_t(w)]);
          break;
        }
      for (int64_t w = nw - 1; w >= 0; --w)
        if (cols[size_t(w)]) {
          right = (w << 6) + 63 - clz64(cols[size_t(w)]);
          break;
        }
      box[0] = left;
      box[1] = top;
      box[2] = right;
      box[3] = bottom;
    }  // empty mask: stays [0, 0, 0, 0]
    if (rb) rb->finish(frame, &out->rle_counts[size_t(n)]);
  });
}

void rle_from_bits(const uint64_t* bits, int64_t N, int64_t H, int64_t W, int64_t words_per_row,
                   const RleFrame& frame, int num_threads, MaskStatsResult* out) {
  if (H < 1 || W < 1) throw std::invalid_argument("rle_from_bits needs H >= 1 and W >= 1");
  const int64_t nw = (W + 63) >> 6;
  if (words_per_row < nw) throw std::invalid_argument("rle_from_bits: words_per_row < ceil(W / 64)");
  check_frame(frame, H, W);
  check_rle_size(frame, H, W);
  out->rle_counts.assign(size_t(N), {});
  if (N == 0) return;
  const int T = resolve_threads(num_threads, N);
  std::vector<RleBuilder> builders(static_cast<size_t>(T));
  std::vector<std::vector<uint64_t>> row_words(static_cast<size_t>(T));
  // Bits past column W are ignored (the producer may leave them unset or garbage).
  const uint64_t tail_mask = (W & 63) ? ((uint64_t(1) << (W & 63)) - 1) : ~uint64_t(0);
  parallel_masks(N, T, [&](int64_t n, int tid) {
    RleBuilder& rb = builders[size_t(tid)];
    std::vector<uint64_t>& words = row_words[size_t(tid)];
    words.resize(size_t(nw));
    rb.begin(H, W);
    for (int64_t i = 0; i < H; ++i) {
      const uint64_t* src = bits + (n * H + i) * words_per_row;
      std::copy(src, src + nw, words.begin());
      words[size_t(nw - 1)] &= tail_mask;
      rb.add_row(i, words.data());
    }
    rb.finish(frame, &out->rle_counts[size_t(n)]);
  });
}

// ------------------------------------------------------------------ public: RLE strings
std::string rle_to_string(const uint32_t* counts, int64_t m) {
  std::string s;
  s.reserve(size_t(m) * 2);
  for (int64_t i = 0; i < m; ++i) {
    int64_t x = int64_t(counts[i]);
    if (i > 2) x -= int64_t(counts[i - 2]);  // maskApi.c: delta coding from the 4th count on
    bool more = true;
    while (more) {
      char c = char(x & 0x1f);
      x >>= 5;  // arithmetic shift: negative deltas end when only sign bits remain
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      s.push_back(char(c + 48));
    }
  }
  return s;
}

std::vector<uint32_t> rle_from_string(const std::string& s) {
  std::vector<uint32_t> cnts;
  cnts.reserve(s.size());
  size_t p = 0;
  while (p < s.size()) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      if (p >= s.size()) throw std::invalid_argument("RLE string ends inside a count");
      const int c = int(static_cast<unsigned char>(s[p])) - 48;
      if (c < 0 || c > 63) throw std::invalid_argument("RLE string holds a character outside '0'..'o'");
      if (k >= 12) throw std::invalid_argument("RLE string holds a count longer than 12 characters");
      x |= int64_t(c & 0x1f) << (5 * k);
      more = (c & 0x20) != 0;
      ++p;
      ++k;
      if (!more && (c & 0x10)) x |= int64_t(-1) * (int64_t(1) << (5 * k));  // sign-extend
    }
    if (cnts.size() > 2) x += int64_t(cnts[cnts.size() - 2]);
    if (x < 0 || x > int64_t(UINT32_MAX)) throw std::invalid_argument("RLE string decodes to a negative or too large count");
    cnts.push_back(uint32_t(x));
  }
  return cnts;
}

void rle_decode(const uint32_t* counts, int64_t m, int64_t H, int64_t W, uint8_t* mask) {
  uint64_t total = 0;
  for (int64_t i = 0; i < m; ++i) total += counts[i];
  if (total != uint64_t(H) * uint64_t(W))
    throw std::invalid_argument("RLE counts sum to " + std::to_string(total) + ", expected H * W = " +
                                std::to_string(uint64_t(H) * uint64_t(W)));
  std::memset(mask, 0, size_t(H * W));
  uint64_t pos = 0;
  for (int64_t r = 0; r < m; ++r) {
    const uint64_t len = counts[r];
    if (r & 1) {  // odd runs are ones; walk them column by column
      uint64_t p = pos, end = pos + len;
      while (p < end) {
        const int64_t col = int64_t(p / uint64_t(H));
        int64_t row = int64_t(p % uint64_t(H));
        const uint64_t stop = std::min<uint64_t>(end, uint64_t(col + 1) * uint64_t(H));
        for (; p < stop; ++p, ++row) mask[row * W + col] = 1;
      }
    }
    pos += len;
  }
}

// ------------------------------------------------------------------ public: NMS
template <typename T>
std::vector<int64_t> batched_nms(const T* boxes, const double* scores, const int64_t* idxs,
                                 int64_t N, double iou_threshold, int num_threads) {
  std::vector<int64_t> keep;
  if (N <= 0) return keep;
  // Global order: torch.sort(scores, descending=True, stable=True) - NaN first, ties by index.
  std::vector<int64_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const double sa = scores[a], sb = scores[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na || nb) return na && !nb;
    return sa > sb;
  });
  // Group by class, keeping the score order inside each group.
  std::vector<int64_t> by_class(order);
  std::stable_sort(by_class.begin(), by_class.end(),
                   [&](int64_t a, int64_t b) { return idxs[a] < idxs[b]; });
  std::vector<std::pair<int64_t, int64_t>> groups;  // [begin, end) in by_class
  for (int64_t s = 0; s < N;) {
    int64_t e = s + 1;
    while (e < N && idxs[by_class[size_t(e)]] == idxs[by_class[size_t(s)]]) ++e;
    groups.emplace_back(s, e);
    s = e;
  }
  std::vector<uint8_t> suppressed(size_t(N), 0);
  const int nthreads = resolve_threads(num_threads, int64_t(groups.size()));
  // Greedy NMS per class, arithmetic exactly as torchvision/csrc/ops/cpu/nms_kernel.cpp
  // (areas (x2-x1)*(y2-y1) and IoU in T, `ovr > iou_threshold` in double). This file is built
  // with -ffp-contract=off so no FMA changes a rounding near the threshold.
  parallel_masks(int64_t(groups.size()), nthreads, [&](int64_t g, int) {
    const int64_t b = groups[size_t(g)].first, n = groups[size_t(g)].second - b;
    const size_t sn = static_cast<size_t>(n);
    std::vector<T> x1(sn), y1(sn), x2(sn), y2(sn), area(sn);
    std::vector<uint8_t> sup(sn, 0);
    for (int64_t k = 0; k < n; ++k) {
      const T* bx = boxes + by_class[size_t(b + k)] * 4;
      x1[size_t(k)] = bx[0];
      y1[size_t(k)] = bx[1];
      x2[size_t(k)] = bx[2];
      y2[size_t(k)] = bx[3];
      area[size_t(k)] = (bx[2] - bx[0]) * (bx[3] - bx[1]);
    }
    for (int64_t i = 0; i < n; ++i) {
      if (sup[size_t(i)]) continue;
      const T ix1 = x1[size_t(i)], iy1 = y1[size_t(i)], ix2 = x2[size_t(i)], iy2 = y2[size_t(i)];
      const T iarea = area[size_t(i)];
      for (int64_t j = i + 1; j < n; ++j) {
        if (sup[size_t(j)]) continue;
        const T xx1 = std::max(ix1, x1[size_t(j)]);
        const T yy1 = std::max(iy1, y1[size_t(j)]);
        const T xx2 = std::min(ix2, x2[size_t(j)]);
        const T yy2 = std::min(iy2, y2[size_t(j)]);
        const T w = std::max(T(0), xx2 - xx1);
        const T h = std::max(T(0), yy2 - yy1);
        const T inter = w * h;
        const T ovr = inter / (iarea + area[size_t(j)] - inter);
        if (double(ovr) > iou_threshold) sup[size_t(j)] = 1;
      }
    }
    for (int64_t k = 0; k < n; ++k) suppressed[size_t(by_class[size_t(b + k)])] = sup[size_t(k)];
  });
  for (int64_t i : order)
    if (!suppressed[size_t(i)]) keep.push_back(i);
  return keep;
}

template std::vector<int64_t> batched_nms<float>(const float*, const double*, const int64_t*,
                                                 int64_t, double, int);
template std::vector<int64_t> batched_nms<double>(const double*, const double*, const int64_t*,
                                                  int64_t, double, int);

}  // namespace maskpost
}  // namespace fmrt

// ====================================================================== Python bindings
// Kept here (not in fmrt_C.cpp) so the shared bindings file only gains one call:
// fmrt::maskpost::bind(m).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(FMRT_WITH_CUDA)
#include "cuda/mask_post_cuda.h"
#endif

namespace fmrt {
namespace maskpost {
namespace {

namespace py = pybind11;

py::array contiguous(const py::object& obj, const char* what) {
  py::array arr = py::array::ensure(obj, py::array::c_style);
  if (!arr) {
    PyErr_Clear();
    throw py::type_error(std::string(what) + " must be a numpy array (or convertible to one)");
  }
  return arr;
}

void expect_dtype(const py::array& a, char kind, py::ssize_t itemsize, const char* what,
                  const char* expected) {
  if (a.dtype().kind() != kind || a.dtype().itemsize() != itemsize)
    throw py::type_error(std::string(what) + " must be " + expected + ", got " +
                         std::string(py::str(a.dtype())));
}

RleFrame parse_frame(const py::object& frame) {
  RleFrame f;
  if (frame.is_none()) return f;
  auto v = frame.cast<std::vector<int64_t>>();
  if (v.size() != 4) throw py::value_error("rle_frame must be (x0, y0, out_h, out_w)");
  f.x0 = v[0];
  f.y0 = v[1];
  f.out_h = v[2];
  f.out_w = v[3];
  if (f.out_h < 1 || f.out_w < 1) throw py::value_error("rle_frame sizes must be >= 1");
  return f;
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(py::ssize_t(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

// Ragged counts -> (flat uint32 [total], offsets int64 [N + 1]).
py::tuple pack_counts(const std::vector<std::vector<uint32_t>>& rles) {
  py::array_t<int64_t> offsets(py::ssize_t(rles.size() + 1));
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (size_t i = 0; i < rles.size(); ++i) off[i + 1] = off[i] + int64_t(rles[i].size());
  py::array_t<uint32_t> flat(py::ssize_t(off[rles.size()]));
  uint32_t* dst = flat.mutable_data();
  for (size_t i = 0; i < rles.size(); ++i)
    if (!rles[i].empty()) std::memcpy(dst + off[i], rles[i].data(), rles[i].size() * sizeof(uint32_t));
  return py::make_tuple(flat, offsets);
}

py::tuple py_mask_stats(const py::object& logits_obj, double threshold, double offset,
                        bool want_rle, const py::object& frame_obj, const py::object& indices_obj,
                        int num_threads) {
  py::array logits = contiguous(logits_obj, "logits");
  expect_dtype(logits, 'f', 4, "logits", "float32");
  if (logits.ndim() != 3) throw py::value_error("logits must be 3-D [N, H, W]");
  int64_t N = logits.shape(0);
  const int64_t H = logits.shape(1), W = logits.shape(2);
  if (H < 1 || W < 1) throw py::value_error("logits must have H >= 1 and W >= 1");
  py::array indices;
  const int64_t* idx = nullptr;
  if (!indices_obj.is_none()) {
    indices = contiguous(indices_obj, "indices");
    expect_dtype(indices, 'i', 8, "indices", "int64");
    if (indices.ndim() != 1) throw py::value_error("indices must be 1-D");
    idx = static_cast<const int64_t*>(indices.data());
    for (py::ssize_t i = 0; i < indices.shape(0); ++i)
      if (idx[i] < 0 || idx[i] >= N)
        throw py::index_error("indices[" + std::to_string(i) + "] = " + std::to_string(idx[i]) +
                              " is out of range for " + std::to_string(N) + " masks");
    N = indices.shape(0);
  }
  const RleFrame frame = parse_frame(frame_obj);
  // The thresholds are formed in double and rounded once to float32, like torch comparing a
  // float32 tensor with the Python float `mask_threshold + threshold_offset`.
  const float t = float(threshold), thi = float(threshold + offset), tlo = float(threshold - offset);
  MaskStatsResult r;
  {
    py::gil_scoped_release release;
    mask_stats(static_cast<const float*>(logits.data()), idx, N, H, W, t, thi, tlo, want_rle,
               frame, num_threads, &r);
  }
  py::array_t<int64_t> boxes({N, int64_t(4)});
  if (N) std::memcpy(boxes.mutable_data(), r.boxes.data(), r.boxes.size() * sizeof(int64_t));
  py::object counts = py::none(), offsets = py::none();
  if (want_rle) {
    py::tuple packed = pack_counts(r.rle_counts);
    counts = packed[0];
    offsets = packed[1];
  }
  return py::make_tuple(to_numpy(r.stability), boxes, to_numpy(r.area), to_numpy(r.count_hi),
                        to_numpy(r.count_lo), counts, offsets);
}

py::tuple py_rle_from_bits(const py::object& bits_obj, int64_t W, const py::object& frame_obj,
                           int num_threads) {
  py::array bits = contiguous(bits_obj, "bits");
  expect_dtype(bits, 'u', 8, "bits", "uint64");
  if (bits.ndim() != 3) throw py::value_error("bits must be 3-D [N, H, words_per_row]");
  const int64_t N = bits.shape(0), H = bits.shape(1), wpr = bits.shape(2);
  if (W < 1 || wpr < (W + 63) / 64) throw py::value_error("bits has too few words per row for W");
  const RleFrame frame = parse_frame(frame_obj);
  MaskStatsResult r;
  {
    py::gil_scoped_release release;
    rle_from_bits(static_cast<const uint64_t*>(bits.data()), N, H, W, wpr, frame, num_threads, &r);
  }
  return pack_counts(r.rle_counts);
}

py::array_t<uint32_t> counts_array(const py::object& obj) {
  py::array a = contiguous(obj, "counts");
  expect_dtype(a, 'u', 4, "counts", "uint32");
  if (a.ndim() != 1) throw py::value_error("counts must be 1-D");
  return py::array_t<uint32_t>(a);
}

py::bytes py_rle_to_string(const py::object& counts_obj) {
  py::array_t<uint32_t> c = counts_array(counts_obj);
  std::string s;
  {
    py::gil_scoped_release release;
    s = rle_to_string(c.data(), c.shape(0));
  }
  return py::bytes(s);
}

py::list py_rle_to_strings(const py::object& counts_obj, const py::object& offsets_obj) {
  py::array_t<uint32_t> c = counts_array(counts_obj);
  py::array off = contiguous(offsets_obj, "offsets");
  expect_dtype(off, 'i', 8, "offsets", "int64");
  if (off.ndim() != 1 || off.shape(0) < 1) throw py::value_error("offsets must be 1-D [N + 1]");
  const int64_t* o = static_cast<const int64_t*>(off.data());
  const int64_t n = off.shape(0) - 1;
  for (int64_t i = 0; i < n; ++i)
    if (o[i] < 0 || o[i] > o[i + 1] || o[i + 1] > c.shape(0))
      throw py::value_error("offsets must be non-decreasing and within counts");
  std::vector<std::string> out(static_cast<size_t>(n));
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) out[size_t(i)] = rle_to_string(c.data() + o[i], o[i + 1] - o[i]);
  }
  py::list result(n);
  for (int64_t i = 0; i < n; ++i) result[size_t(i)] = py::bytes(out[size_t(i)]);
  return result;
}

py::array_t<uint32_t> py_rle_from_string(const py::object& s_obj) {
  std::string s;
  if (py::isinstance<py::bytes>(s_obj))
    s = s_obj.cast<std::string>();
  else if (py::isinstance<py::str>(s_obj))
    s = s_obj.cast<std::string>();
  else
    throw py::type_error("RLE string must be bytes or str");
  std::vector<uint32_t> v;
  try {
    v = rle_from_string(s);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return to_numpy(v);
}

py::array_t<uint8_t> py_rle_decode(const py::object& counts_obj, int64_t H, int64_t W) {
  py::array_t<uint32_t> c = counts_array(counts_obj);
  if (H < 0 || W < 0) throw py::value_error("H and W must be >= 0");
  py::array_t<uint8_t> mask({H, W});
  try {
    py::gil_scoped_release release;
    rle_decode(c.data(), c.shape(0), H, W, mask.mutable_data());
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return mask;
}

py::array_t<int64_t> py_batched_nms(const py::object& boxes_obj, const py::object& scores_obj,
                                    const py::object& idxs_obj, double iou_threshold,
                                    int num_threads) {
  py::array boxes = contiguous(boxes_obj, "boxes");
  py::array scores = contiguous(scores_obj, "scores");
  py::array idxs = contiguous(idxs_obj, "idxs");
  if (boxes.ndim() != 2 || boxes.shape(1) != 4) throw py::value_error("boxes must be [N, 4]");
  const int64_t N = boxes.shape(0);
  if (scores.ndim() != 1 || scores.shape(0) != N) throw py::value_error("scores must be [N]");
  if (idxs.ndim() != 1 || idxs.shape(0) != N) throw py::value_error("idxs must be [N]");
  expect_dtype(scores, 'f', 8, "scores", "float64");
  expect_dtype(idxs, 'i', 8, "idxs", "int64");
  const double* s = static_cast<const double*>(scores.data());
  const int64_t* c = static_cast<const int64_t*>(idxs.data());
  std::vector<int64_t> keep;
  if (boxes.dtype().kind() == 'f' && boxes.dtype().itemsize() == 4) {
    const float* b = static_cast<const float*>(boxes.data());
    py::gil_scoped_release release;
    keep = batched_nms<float>(b, s, c, N, iou_threshold, num_threads);
  } else if (boxes.dtype().kind() == 'f' && boxes.dtype().itemsize() == 8) {
    const double* b = static_cast<const double*>(boxes.data());
    py::gil_scoped_release release;
    keep = batched_nms<double>(b, s, c, N, iou_threshold, num_threads);
  } else {
    throw py::type_error("boxes must be float32 or float64, got " + std::string(py::str(boxes.dtype())));
  }
  return to_numpy(keep);
}

#if defined(FMRT_WITH_CUDA)
void py_mask_stats_cuda(uintptr_t logits, int64_t N, int64_t H, int64_t W, double threshold,
                        double offset, uintptr_t counts, uintptr_t boxes, uintptr_t stability,
                        uintptr_t bits, int64_t words_per_row, uintptr_t stream) {
  if (N < 0 || H < 1 || W < 1) throw py::value_error("mask_stats_cuda needs N >= 0, H, W >= 1");
  if (bits && words_per_row < (W + 63) / 64) throw py::value_error("words_per_row < ceil(W / 64)");
  py::gil_scoped_release release;
  fmrt::cuda::mask_stats(reinterpret_cast<const float*>(logits), N, H, W, float(threshold),
                         float(threshold + offset), float(threshold - offset),
                         reinterpret_cast<int64_t*>(counts), reinterpret_cast<int64_t*>(boxes),
                         reinterpret_cast<float*>(stability), reinterpret_cast<uint64_t*>(bits),
                         words_per_row, reinterpret_cast<void*>(stream));
}
#endif

}  // namespace

void bind(py::module_& m) {
  m.def("mask_stats", &py_mask_stats, py::arg("logits"), py::arg("threshold") = 0.0,
        py::arg("offset") = 1.0, py::arg("want_rle") = true, py::arg("rle_frame") = py::none(),
        py::arg("indices") = py::none(), py::arg("num_threads") = 0,
        R"doc(One pass over float32 logits [N, H, W]: SAM threshold, stability, box, RLE.

Returns (stability float32 [N], boxes int64 [N, 4] XYXY inclusive, area int64 [N],
count_hi int64 [N], count_lo int64 [N], rle_counts uint32 [total] | None,
rle_offsets int64 [N + 1] | None). rle_frame=(x0, y0, out_h, out_w) encodes the mask padded
into a larger zero frame (amg.uncrop_masks). indices (int64 [K]) restricts the pass to those
masks, in that order (N becomes K).)doc");
  m.def("rle_from_bits", &py_rle_from_bits, py::arg("bits"), py::arg("W"),
        py::arg("rle_frame") = py::none(), py::arg("num_threads") = 0,
        "COCO RLE counts from bit-packed masks uint64 [N, H, words_per_row]: (counts, offsets).");
  m.def("rle_to_string", &py_rle_to_string, py::arg("counts"),
        "pycocotools' compressed RLE string (bytes) of uint32 counts.");
  m.def("rle_to_strings", &py_rle_to_strings, py::arg("counts"), py::arg("offsets"),
        "rle_to_string for each counts[offsets[i]:offsets[i+1]]: list of bytes.");
  m.def("rle_from_string", &py_rle_from_string, py::arg("s"),
        "Decode pycocotools' compressed RLE string into uint32 counts.");
  m.def("rle_decode", &py_rle_decode, py::arg("counts"), py::arg("H"), py::arg("W"),
        "Uncompressed COCO RLE counts -> uint8 mask [H, W] (C order).");
  m.def("batched_nms", &py_batched_nms, py::arg("boxes"), py::arg("scores"), py::arg("idxs"),
        py::arg("iou_threshold"), py::arg("num_threads") = 0,
        "torchvision.ops.batched_nms on float32/float64 boxes [N, 4], float64 scores, int64 idxs.");
#if defined(FMRT_WITH_CUDA)
  m.def("mask_stats_cuda", &py_mask_stats_cuda, py::arg("logits"), py::arg("N"), py::arg("H"),
        py::arg("W"), py::arg("threshold"), py::arg("offset"), py::arg("counts"), py::arg("boxes"),
        py::arg("stability"), py::arg("bits"), py::arg("words_per_row"), py::arg("stream"),
        R"doc(CUDA mask_stats on device pointers (asynchronous on `stream`, a cudaStream_t).

logits float32 [N, H, W]; counts int64 [N, 3] (hi, lo, area); boxes int64 [N, 4];
stability float32 [N]; bits uint64 [N, H, words_per_row] or 0 to skip the bit-packed mask.)doc");
#endif
}

}  // namespace maskpost
}  // namespace fmrt
