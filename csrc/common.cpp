// The vectorised block loops of common.h and rows.h. The float versions are compiled once per ISA
// (FL_MULTIVERSION); the double versions (gradcheck precision) are plain.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>

#include "rows.h"

namespace fusedloss {
namespace {

template <typename T>
inline T max_impl(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename T>
inline T sum_exp_impl(const T* x, int64_t n, T shift) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp_le88(x[i] - shift);
  return s;
}

template <typename T>
inline T sum_exp_max_impl(const T* x, int64_t n, T shift, T* mx) {
  T s = 0;
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(+ : s) reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    s += fast_exp_le88(x[i] - shift);
    m = x[i] > m ? x[i] : m;
  }
  *mx = m;
  return s;
}

template <typename T>
inline T dot_impl(const T* x, const T* w, int64_t n) {
  T s = 0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += x[i];
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += x[i] * w[i];
  }
  return s;
}

FL_MULTIVERSION float max_f(const float* x, int64_t n) { return max_impl(x, n); }
FL_MULTIVERSION float sum_exp_f(const float* x, int64_t n, float s) { return sum_exp_impl(x, n, s); }
FL_MULTIVERSION float sum_exp_max_f(const float* x, int64_t n, float s, float* mx) {
  return sum_exp_max_impl(x, n, s, mx);
}
FL_MULTIVERSION float dot_f(const float* x, const float* w, int64_t n) { return dot_impl(x, w, n); }

template <typename T>
inline T softmax_grad_impl(const T* x, const T* w, int64_t n, T lse, T a, T k, T scale, T* g) {
  T sum = 0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp_le88(x[i] - lse);
      sum += p;
      g[i] = scale * (p * a - k);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp_le88(x[i] - lse);
      sum += p;
      g[i] = scale * (p * a - k * w[i]);
    }
  }
  return sum;
}
FL_MULTIVERSION float softmax_grad_f(const float* x, const float* w, int64_t n, float lse, float a,
                                     float k, float scale, float* g) {
  return softmax_grad_impl(x, w, n, lse, a, k, scale, g);
}

template <typename T>
inline void tile_max_impl(const T* x, int64_t n, T* m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) m[i] = std::max(m[i], x[i]);
}
template <typename T>
inline void tile_sum_exp_impl(const T* x, int64_t n, const T* m, const T* tv, T c, T* s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] += tv[i] == c ? T(0) : fast_exp_le88(x[i] - m[i]);
}
template <typename T>
inline void tile_softmax_grad_impl(const T* x, int64_t n, const T* lse, const T* a, const T* b,
                                   T wc, const T* tv, T c, T* q, T* g) {
  if (b == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp_le88(x[i] - lse[i]);
      q[i] += tv[i] == c ? T(0) : p;
      g[i] = a[i] * p;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp_le88(x[i] - lse[i]);
      q[i] += tv[i] == c ? T(0) : p;
      g[i] = a[i] * p - b[i] * wc;
    }
  }
}

template <typename T>
inline void tile_dot_impl(const T* x, int64_t n, T wc, T* d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += wc * x[i];
}

template <typename H>
inline void to_acc_impl(const H* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename H>
inline void from_acc_impl(const float* src, int64_t n, H* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<H>(src[i]);
}
// float -> bf16 through float_to_bf16_bits (common.h): c10's conversion does not vectorise.
inline void from_acc_impl(const float* src, int64_t n, c10::BFloat16* dst) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16_bits(src[i]);
}

}  // namespace

float block_softmax_grad(const float* x, const float* w, int64_t n, float lse, float a, float k,
                         float scale, float* g) {
  return softmax_grad_f(x, w, n, lse, a, k, scale, g);
}
double block_softmax_grad(const double* x, const double* w, int64_t n, double lse, double a,
                          double k, double scale, double* g) {
  return softmax_grad_impl(x, w, n, lse, a, k, scale, g);
}

FL_MULTIVERSION void to_acc(const c10::BFloat16* s, int64_t n, float* d) { to_acc_impl(s, n, d); }
FL_MULTIVERSION void to_acc(const c10::Half* s, int64_t n, float* d) { to_acc_impl(s, n, d); }
FL_MULTIVERSION void from_acc(const float* s, int64_t n, c10::BFloat16* d) { from_acc_impl(s, n, d); }
FL_MULTIVERSION void from_acc(const float* s, int64_t n, c10::Half* d) { from_acc_impl(s, n, d); }

// The sums of exp over bf16 rows read in place, widened in registers (no fp32 copy of the row),
// in lane arrays as lane_sum (common.h) and for the same reason.
FL_MULTIVERSION float block_sum_exp_max(const c10::BFloat16* x, int64_t n, float shift, float* mx) {
  float s[kSumLanes] = {};
  float m[kSumLanes];
  std::fill_n(m, kSumLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) {
      const float v = bf16_to_float(x[i + j]);
      s[j] += fast_exp_le88(v - shift);
      m[j] = v > m[j] ? v : m[j];
    }
  }
  float st = 0, mt = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) {
    const float v = bf16_to_float(x[i]);
    st += fast_exp_le88(v - shift);
    mt = v > mt ? v : mt;
  }
  for (int j = 0; j < kSumLanes; ++j) mt = m[j] > mt ? m[j] : mt;
  *mx = mt;
  return pairwise_sum(s, kSumLanes) + st;
}
FL_MULTIVERSION float block_sum_exp(const c10::BFloat16* x, int64_t n, float shift) {
  return lane_sum<float>(n, [&](int64_t i) {
    return fast_exp_le88(bf16_to_float(x[i]) - shift);
  });
}

// The softmax gradient of bf16 rows read and written in place, fp32 math as in
// block_softmax_grad's float version and the same rounding to bf16 as from_acc; the sum of p in
// lane arrays as lane_sum. (x == g is allowed: each element is read before it is written.)
FL_MULTIVERSION float block_softmax_grad(const c10::BFloat16* x, const float* w, int64_t n,
                                         float lse, float a, float k, float scale,
                                         c10::BFloat16* g) {
  uint16_t* out = reinterpret_cast<uint16_t*>(g);
  if (w == nullptr) {
    return lane_sum<float>(n, [&](int64_t i) {
      const float p = fast_exp_le88(bf16_to_float(x[i]) - lse);
      out[i] = float_to_bf16_bits(scale * (p * a - k));
      return p;
    });
  }
  return lane_sum<float>(n, [&](int64_t i) {
    const float p = fast_exp_le88(bf16_to_float(x[i]) - lse);
    out[i] = float_to_bf16_bits(scale * (p * a - k * w[i]));
    return p;
  });
}

FL_MULTIVERSION void tile_max(const float* x, int64_t n, float* m) { tile_max_impl(x, n, m); }
void tile_max(const double* x, int64_t n, double* m) { tile_max_impl(x, n, m); }
FL_MULTIVERSION void tile_sum_exp(const float* x, int64_t n, const float* m, const float* tv,
                                  float c, float* s) {
  tile_sum_exp_impl(x, n, m, tv, c, s);
}
void tile_sum_exp(const double* x, int64_t n, const double* m, const double* tv, double c,
                  double* s) {
  tile_sum_exp_impl(x, n, m, tv, c, s);
}
FL_MULTIVERSION void tile_softmax_grad(const float* x, int64_t n, const float* lse, const float* a,
                                       const float* b, float wc, const float* tv, float c,
                                       float* q, float* g) {
  tile_softmax_grad_impl(x, n, lse, a, b, wc, tv, c, q, g);
}
void tile_softmax_grad(const double* x, int64_t n, const double* lse, const double* a,
                       const double* b, double wc, const double* tv, double c, double* q,
                       double* g) {
  tile_softmax_grad_impl(x, n, lse, a, b, wc, tv, c, q, g);
}

FL_MULTIVERSION void tile_dot(const float* x, int64_t n, float wc, float* d) {
  tile_dot_impl(x, n, wc, d);
}
void tile_dot(const double* x, int64_t n, double wc, double* d) { tile_dot_impl(x, n, wc, d); }

template <> float block_max(const float* x, int64_t n) { return max_f(x, n); }
template <> double block_max(const double* x, int64_t n) { return max_impl(x, n); }
template <> float block_sum_exp(const float* x, int64_t n, float s) { return sum_exp_f(x, n, s); }
template <> double block_sum_exp(const double* x, int64_t n, double s) { return sum_exp_impl(x, n, s); }
template <> float block_sum_exp_max(const float* x, int64_t n, float s, float* mx) {
  return sum_exp_max_f(x, n, s, mx);
}
template <> double block_sum_exp_max(const double* x, int64_t n, double s, double* mx) {
  return sum_exp_max_impl(x, n, s, mx);
}
template <> float block_dot(const float* x, const float* w, int64_t n) { return dot_f(x, w, n); }
template <> double block_dot(const double* x, const double* w, int64_t n) { return dot_impl(x, w, n); }

// ---- reused large buffers (common.h) -----------------------------------------------------------

namespace {
constexpr size_t kReuseMinBytes = size_t(8) << 20;
std::mutex g_kept_mutex;
void* g_kept = nullptr;  // the one freed buffer kept, and its size
size_t g_kept_bytes = 0;

bool reuse_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FUSEDLOSS_REUSE_BUFFERS");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// A buffer's deleter: it becomes the kept one (the most recently freed: a training loop frees
// the buffer its next step asks for; a stale larger one would never fit again), the old is freed.
void give_back(void* p, size_t bytes) {
  void* old = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_kept_mutex);
    old = g_kept;
    g_kept = p;
    g_kept_bytes = bytes;
  }
  if (old != nullptr) c10::free_cpu(old);
}
}  // namespace

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (!reuse_enabled() || bytes < kReuseMinBytes || !options.device().is_cpu()) {
    return at::empty(sizes, options);
  }
  void* p = nullptr;
  size_t cap = bytes;
  {
    std::lock_guard<std::mutex> lock(g_kept_mutex);
    if (g_kept != nullptr && g_kept_bytes >= bytes && g_kept_bytes <= bytes + bytes / 2) {
      std::swap(p, g_kept);
      cap = g_kept_bytes;
      g_kept_bytes = 0;
    }
  }
  if (p == nullptr) p = c10::alloc_cpu(bytes);  // (honours THP_MEM_ALLOC_ENABLE, as torch's)
  return at::from_blob(p, sizes, [cap](void* d) { give_back(d, cap); }, options);
}

int64_t release_buffers() {  // (the op fusedloss::release_buffers)
  std::lock_guard<std::mutex> lock(g_kept_mutex);
  const int64_t freed = static_cast<int64_t>(g_kept_bytes);
  if (g_kept != nullptr) c10::free_cpu(g_kept);
  g_kept = nullptr;
  g_kept_bytes = 0;
  return freed;
}

}  // namespace fusedloss

// An op without tensor arguments dispatches to its CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(fusedloss, CompositeImplicitAutograd, m) {
  m.impl("release_buffers", &fusedloss::release_buffers);
}
