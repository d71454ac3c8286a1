// The vectorised block loops of common.h and rows.h. The float versions are compiled once per ISA
// (FL_MULTIVERSION); the double versions (gradcheck precision) are plain.
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
  for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] - shift);
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
FL_MULTIVERSION float dot_f(const float* x, const float* w, int64_t n) { return dot_impl(x, w, n); }

template <typename T>
inline T softmax_grad_impl(const T* x, const T* w, int64_t n, T lse, T a, T k, T scale, T* g) {
  T sum = 0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp(x[i] - lse);
      sum += p;
      g[i] = scale * (p * a - k);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const T p = fast_exp(x[i] - lse);
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

template <> float block_max(const float* x, int64_t n) { return max_f(x, n); }
template <> double block_max(const double* x, int64_t n) { return max_impl(x, n); }
template <> float block_sum_exp(const float* x, int64_t n, float s) { return sum_exp_f(x, n, s); }
template <> double block_sum_exp(const double* x, int64_t n, double s) { return sum_exp_impl(x, n, s); }
template <> float block_dot(const float* x, const float* w, int64_t n) { return dot_f(x, w, n); }
template <> double block_dot(const double* x, const double* w, int64_t n) { return dot_impl(x, w, n); }

}  // namespace fusedloss
