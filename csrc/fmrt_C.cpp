// Python bindings for fmrt._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "topk_ip.h"

#if defined(FMRT_WITH_CUDA)
#include "cuda/topk_ip_cuda.h"
#endif

#ifndef FMRT_VERSION
#define FMRT_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace fmrt::maskpost {
void bind(py::module_& m);  // csrc/mask_post.cpp: SAM mask post-processing ops
}

namespace {

// Any array-like -> C-contiguous ndarray of unchanged dtype (copies only if needed).
py::array as_contiguous(const py::object& obj, const char* what) {
  py::array arr = py::array::ensure(obj, py::array::c_style);
  if (!arr) {
    PyErr_Clear();
    throw py::type_error(std::string(what) + " must be a numpy array (or convertible to one)");
  }
  return arr;
}

bool is_float(const py::array& a, py::ssize_t itemsize) {
  return a.dtype().kind() == 'f' && a.dtype().itemsize() == itemsize;
}

struct Checked {
  py::array queries, gallery;
  int64_t Q, D, N, k;
  fmrt::GalleryDType gdt;
};

Checked check_inputs(const py::object& queries_obj, const py::object& gallery_obj, int64_t k) {
  Checked c;
  c.queries = as_contiguous(queries_obj, "queries");
  c.gallery = as_contiguous(gallery_obj, "gallery");
  if (c.queries.ndim() != 2)
    throw py::value_error("queries must be 2-D [Q, D], got " + std::to_string(c.queries.ndim()) + "-D");
  if (c.gallery.ndim() != 2)
    throw py::value_error("gallery must be 2-D [N, D], got " + std::to_string(c.gallery.ndim()) + "-D");
  if (!is_float(c.queries, 4))
    throw py::type_error("queries must be float32, got " + std::string(py::str(c.queries.dtype())));
  if (is_float(c.gallery, 4))
    c.gdt = fmrt::GalleryDType::kFloat32;
  else if (is_float(c.gallery, 2))
    c.gdt = fmrt::GalleryDType::kFloat16;
  else
    throw py::type_error("gallery must be float32 or float16, got " + std::string(py::str(c.gallery.dtype())));
  c.Q = c.queries.shape(0);
  c.D = c.queries.shape(1);
  c.N = c.gallery.shape(0);
  if (c.gallery.shape(1) != c.D)
    throw py::value_error("dimension mismatch: queries have D=" + std::to_string(c.D) +
                          " but gallery has D=" + std::to_string(c.gallery.shape(1)));
  if (c.D > std::numeric_limits<int32_t>::max()) throw py::value_error("D is too large");
  if (k <= 0) throw py::value_error("k must be positive, got " + std::to_string(k));
  c.k = std::min(k, c.N);  // k > N returns all N rows
  return c;
}

py::tuple topk_ip(const py::object& queries_obj, const py::object& gallery_obj, int64_t k,
                  int num_threads) {
  Checked c = check_inputs(queries_obj, gallery_obj, k);
  py::array_t<float> scores({c.Q, c.k});
  py::array_t<int64_t> indices({c.Q, c.k});
  const float* q = static_cast<const float*>(c.queries.data());
  const void* g = c.gallery.data();
  float* s = scores.mutable_data();
  int64_t* idx = indices.mutable_data();
  {
    py::gil_scoped_release release;
    fmrt::topk_ip_cpu(q, c.Q, c.D, g, c.gdt, c.N, c.k, s, idx, num_threads);
  }
  return py::make_tuple(scores, indices);
}

#if defined(FMRT_WITH_CUDA)
py::tuple topk_ip_cuda(const py::object& queries_obj, const py::object& gallery_obj, int64_t k,
                       int device) {
  Checked c = check_inputs(queries_obj, gallery_obj, k);
  py::array_t<float> scores({c.Q, c.k});
  py::array_t<int64_t> indices({c.Q, c.k});
  const float* q = static_cast<const float*>(c.queries.data());
  const void* g = c.gallery.data();
  float* s = scores.mutable_data();
  int64_t* idx = indices.mutable_data();
  {
    py::gil_scoped_release release;
    fmrt::cuda::topk_ip(q, c.Q, c.D, g, c.gdt == fmrt::GalleryDType::kFloat16, c.N, c.k, s, idx,
                        device);
  }
  return py::make_tuple(scores, indices);
}
#endif

bool built_with_cuda() {
#if defined(FMRT_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

bool has_cuda() {
#if defined(FMRT_WITH_CUDA)
  return fmrt::cuda::device_count() > 0;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmrt native kernels (CPU, optionally CUDA)";
  m.attr("__version__") = FMRT_VERSION;

  m.def("topk_ip", &topk_ip, py::arg("queries"), py::arg("gallery"), py::arg("k"),
        py::arg("num_threads") = 0,
        R"doc(Top-k inner products: (scores float32 [Q,k], indices int64 [Q,k]).

queries: float32 [Q, D]; gallery: float32 or float16 [N, D]. Results are sorted by
descending score, ties broken by the lower index; k is clamped to N and must be > 0.
The gallery is streamed in blocks, so memory is O(threads * Q * k), not O(Q * N).
num_threads <= 0 uses the OpenMP default.)doc");
#if defined(FMRT_WITH_CUDA)
  m.def("topk_ip_cuda", &topk_ip_cuda, py::arg("queries"), py::arg("gallery"), py::arg("k"),
        py::arg("device") = 0,
        "Same contract as topk_ip, computed on a CUDA device (inputs are copied per call).");
#endif
  fmrt::maskpost::bind(m);
  m.def("has_cuda", &has_cuda, "True when built with CUDA and a CUDA device is visible.");
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("num_threads", &fmrt::default_num_threads, "Default OpenMP thread count.");
  m.def("kernel_isa", &fmrt::kernel_isa, "CPU kernel set in use: 'avx2' or 'generic'.");
  m.def(
      "_set_kernel_isa",
      [](const std::string& name) {
        if (!fmrt::set_kernel_isa(name))
          throw py::value_error("kernel set '" + name + "' is not available on this CPU/build");
      },
      py::arg("name"), "Testing hook: force 'generic', 'avx2' or 'auto' kernels.");
  m.def("build_info", []() {
    py::dict d;
    d["version"] = FMRT_VERSION;
    d["kernel_isa"] = fmrt::kernel_isa();
    d["num_threads"] = fmrt::default_num_threads();
    d["built_with_cuda"] = built_with_cuda();
#if defined(_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  });
}
