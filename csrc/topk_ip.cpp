#include "topk_ip.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "kernels.h"

namespace fmrt {
namespace {

// ------------------------------------------------------------------ kernel dispatch
const KernelTable* best_kernels() {
#if defined(FMRT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return &avx2_kernels();
#endif
  return &generic_kernels();
}

std::atomic<const KernelTable*>& active_kernels() {
  static std::atomic<const KernelTable*> k{best_kernels()};
  return k;
}

// ------------------------------------------------------------------ selection
struct Cand {
  float s;
  int64_t i;
};

// Total order: higher score first, NaN above everything, ties -> lower index.
inline bool better(const Cand& a, const Cand& b) {
  const bool an = std::isnan(a.s), bn = std::isnan(b.s);
  if (an | bn) {
    if (an != bn) return an;
    return a.i < b.i;
  }
  if (a.s != b.s) return a.s > b.s;
  return a.i < b.i;
}

// Bounded candidate buffer for one query: accepts scores above the current k-th best and
// compacts with nth_element when full, so each score costs O(1) amortised for any k.
struct Selector {
  Cand* buf;
  int64_t size;
  int64_t cap;
  int64_t k;
  // k-th best score after the first compaction; NaN means "accept everything". Rows arrive
  // in increasing index order, so a later equal score can never beat the k-th best: the
  // filter `!(s <= thr)` drops ties and keeps NaNs.
  float thr;

  void init(Cand* storage, int64_t capacity, int64_t kk) {
    buf = storage;
    size = 0;
    cap = capacity;
    k = kk;
    thr = std::numeric_limits<float>::quiet_NaN();
  }

  void compact() {
    std::nth_element(buf, buf + (k - 1), buf + size, better);
    size = k;
    thr = buf[k - 1].s;
  }

  void push(const float* scores, int n, int64_t base) {
    constexpr int kChunk = 16;
    for (int j0 = 0; j0 < n; j0 += kChunk) {
      const int j1 = std::min(n, j0 + kChunk);
      // Branch-free (vectorisable) test first: most chunks hold no candidate once the
      // threshold has settled.
      const float t = thr;
      int hit = 0;  // int, not bool: GCC only vectorises the int reduction
      for (int j = j0; j < j1; ++j) hit |= int(!(scores[j] <= t));
      if (!hit) continue;
      for (int j = j0; j < j1; ++j) {
        const float s = scores[j];
        if (!(s <= thr)) {
          buf[size++] = Cand{s, base + j};
          if (size == cap && size > k) compact();
        }
      }
    }
  }

  // Leaves the best min(k, size) candidates sorted at the front; returns their count.
  int64_t finish() {
    if (size > k) compact();
    std::sort(buf, buf + size, better);
    return size;
  }
};

struct Task {
  int64_t q0, q1, n0, n1;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::string kernel_isa() { return active_kernels().load()->name; }

bool set_kernel_isa(const std::string& name) {
  if (name == "auto") {
    active_kernels().store(best_kernels());
    return true;
  }
  if (name == "generic") {
    active_kernels().store(&generic_kernels());
    return true;
  }
#if defined(FMRT_HAVE_AVX2_KERNELS)
  if (name == "avx2" && best_kernels() == &avx2_kernels()) {
    active_kernels().store(&avx2_kernels());
    return true;
  }
#endif
  return false;
}

int default_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void topk_ip_cpu(const float* queries, int64_t Q, int64_t D, const void* gallery,
                 GalleryDType gdt, int64_t N, int64_t k, float* out_scores,
                 int64_t* out_indices, int num_threads) {
  if (Q <= 0 || k <= 0 || N <= 0) return;
  const KernelTable& K = *active_kernels().load();
  // Below ~2M multiply-adds (~0.1 ms on one core) waking a thread team costs more than it saves.
  const bool tiny = double(Q) * double(N) * double(std::max<int64_t>(D, 1)) < double(1 << 21);
  const int T = tiny ? 1 : std::max(1, num_threads > 0 ? num_threads : default_num_threads());
  const bool half = gdt == GalleryDType::kFloat16;

  // ---- rows per streamed block: a packed block of ~128 KiB stays in L2.
  const int64_t block_rows = std::clamp<int64_t>((32768 / std::max<int64_t>(D, 1)) / kPanel * kPanel,
                                                 kPanel, 512);
  const int kQueryTile = 64;  // queries whose scores are computed per block (bounds scratch)
  const int kMinPackedQueries = 4;

  // ---- work split. Splitting the gallery (Nc chunks) reads and packs it once in total and
  // only adds a cheap merge of Nc * k candidates per query; splitting queries (Qc chunks)
  // re-reads and re-packs it per chunk. So prefer gallery chunks, several per thread: with
  // dynamic scheduling a thread that gets preempted (busy hosts) then delays less work.
  const int64_t cap_full = 2 * k + 16;
  const int64_t kTasksPerThread = T > 1 ? 4 : 1;
  const int64_t min_rows_per_chunk = std::max<int64_t>(1024, 8 * k);
  int64_t Nc = std::max<int64_t>(1, std::min<int64_t>(T * kTasksPerThread, N / min_rows_per_chunk));
  const int64_t budget_bytes = int64_t(256) << 20;  // partial results held for the merge
  while (Nc > 1 && Nc * Q * std::min(cap_full, ceil_div(N, Nc)) * int64_t(sizeof(Cand)) > budget_bytes)
    --Nc;
  int64_t Qc = std::min<int64_t>(ceil_div(T, Nc), ceil_div(Q, kMinPackedQueries));
  Qc = std::max<int64_t>(1, std::min(Qc, Q));

  std::vector<Task> tasks;
  tasks.reserve(size_t(Nc * Qc));
  for (int64_t a = 0; a < Qc; ++a)
    for (int64_t b = 0; b < Nc; ++b)
      tasks.push_back(Task{Q * a / Qc, Q * (a + 1) / Qc, N * b / Nc, N * (b + 1) / Nc});
  const int64_t ntasks = int64_t(tasks.size());

  // Candidate storage per task, allocated up front (no allocation failure inside the
  // parallel region) and kept until the merge when the gallery is split.
  std::vector<std::vector<Cand>> storage(static_cast<size_t>(ntasks));
  std::vector<std::vector<Selector>> selectors(static_cast<size_t>(ntasks));
  for (int64_t t = 0; t < ntasks; ++t) {
    const Task& tk = tasks[size_t(t)];
    const int64_t nq = tk.q1 - tk.q0;
    const int64_t cap = std::min(cap_full, std::max(tk.n1 - tk.n0, k));
    storage[size_t(t)].resize(size_t(nq * cap));
    selectors[size_t(t)].resize(size_t(nq));
    for (int64_t i = 0; i < nq; ++i)
      selectors[size_t(t)][size_t(i)].init(storage[size_t(t)].data() + i * cap, cap, k);
  }
  std::exception_ptr error;

  // One task: stream gallery rows [n0, n1) for queries [q0, q1).
  auto run_task = [&](int64_t t) {
    const Task tk = tasks[size_t(t)];
    const int64_t nq = tk.q1 - tk.q0;
    auto& sel = selectors[size_t(t)];

    const bool packed = nq >= kMinPackedQueries;
    const int64_t tile = std::min<int64_t>(nq, kQueryTile);
    std::vector<float> scores(size_t(tile * block_rows));
    std::vector<float> gbuf;  // packed block, or fp16 block converted row-major
    if (packed || half) gbuf.resize(size_t(ceil_div(block_rows, kPanel) * kPanel * D));

    const float* qbase = queries + tk.q0 * D;
    for (int64_t n = tk.n0; n < tk.n1; n += block_rows) {
      const int rows = int(std::min(block_rows, tk.n1 - n));
      const float* g32 = nullptr;
      if (packed) {
        if (half)
          K.pack_f16(static_cast<const uint16_t*>(gallery) + n * D, D, rows, int(D), gbuf.data());
        else
          K.pack_f32(static_cast<const float*>(gallery) + n * D, D, rows, int(D), gbuf.data());
      } else if (half) {
        K.cvt_f16(static_cast<const uint16_t*>(gallery) + n * D, rows * D, gbuf.data());
        g32 = gbuf.data();
      } else {
        g32 = static_cast<const float*>(gallery) + n * D;
      }
      for (int64_t i0 = 0; i0 < nq; i0 += tile) {
        const int m = int(std::min(tile, nq - i0));
        if (packed)
          K.gemm_packed(qbase + i0 * D, D, m, gbuf.data(), rows, int(D), scores.data(), block_rows);
        else
          K.dot_rows(qbase + i0 * D, D, m, g32, D, rows, int(D), scores.data(), block_rows);
        for (int i = 0; i < m; ++i) sel[size_t(i0 + i)].push(scores.data() + i * block_rows, rows, n);
      }
    }

    if (Nc == 1) {  // this task owns whole queries: write them out directly
      for (int64_t i = 0; i < nq; ++i) {
        Selector& s = sel[size_t(i)];
        const int64_t cnt = s.finish();
        float* os = out_scores + (tk.q0 + i) * k;
        int64_t* oi = out_indices + (tk.q0 + i) * k;
        for (int64_t j = 0; j < cnt; ++j) {
          os[j] = s.buf[j].s;
          oi[j] = s.buf[j].i;
        }
      }
    } else {
      for (int64_t i = 0; i < nq; ++i) {  // shrink to <= k candidates before the merge
        Selector& s = sel[size_t(i)];
        if (s.size > k) s.compact();
      }
    }
  };

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(std::min<int64_t>(T, ntasks)))
#endif
  for (int64_t t = 0; t < ntasks; ++t) {
    try {
      run_task(t);
    } catch (...) {  // exceptions must not escape an OpenMP region
#if defined(_OPENMP)
#pragma omp critical(fmrt_topk_error)
#endif
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  if (Nc == 1) return;

  // ---- merge the Nc partial results (<= k each) of each query.
  std::vector<Cand> merge_buf(size_t(Q * Nc * k));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(int(std::min<int64_t>(T, Q)))
#endif
  for (int64_t q = 0; q < Q; ++q) {
    Cand* all = merge_buf.data() + q * Nc * k;
    int64_t used = 0;
    int64_t ci = 0;  // query chunk holding q (Qc <= threads, so a scan is cheap)
    while (q >= tasks[size_t(ci * Nc)].q1) ++ci;
    const int64_t q0 = tasks[size_t(ci * Nc)].q0;
    for (int64_t b = 0; b < Nc; ++b) {
      const Selector& s = selectors[size_t(ci * Nc + b)][size_t(q - q0)];
      std::copy(s.buf, s.buf + s.size, all + used);
      used += s.size;
    }
    const int64_t cnt = std::min(k, used);
    std::partial_sort(all, all + cnt, all + used, better);
    for (int64_t j = 0; j < cnt; ++j) {
      out_scores[q * k + j] = all[size_t(j)].s;
      out_indices[q * k + j] = all[size_t(j)].i;
    }
  }
}

}  // namespace fmrt
