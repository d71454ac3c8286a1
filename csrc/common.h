// Shared helpers for the CPU kernels: a vectorisable exp, block loads with fp32 upcast,
// the blocked online log-sum-exp, and the checks every op makes on its arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fusedloss {

// Rows are processed in blocks that stay in L1: converted to fp32 once, then swept by the
// vectorised loops below.
constexpr int64_t kBlock = 1024;

// The hot loops are compiled for x86-64-v4 (AVX-512 F/BW/DQ/VL: every AVX-512 CPU but Xeon Phi,
// which takes the v3 clone), x86-64-v3 (AVX2 + FMA) and baseline x86-64; the loader picks one at
// run time, so the wheel stays portable and still uses wide vectors where the CPU has them.
// v4 rather than plain "avx512f": without AVX512BW gcc has no 512-bit 16-bit-lane vectors and
// compiled every loop that reads bf16 at 256 bits. x86-64-v3 rather than plain "avx2": that target has no FMA, so every polynomial step
// of fast_exp/fast_log was a separate multiply and add (fp32 cross-entropy forward 4096x32000,
// AVX2 code on this machine: 97-102 ms with FMA vs 118-127 ms without).
// FUSEDLOSS_MAX_ISA=baseline (FL_MAX_ISA_BASELINE): none of them, only the portable code that
// other CPUs and compilers build (ARM, clang), so that it can be tested on x86.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FL_MAX_ISA_BASELINE)
#define FL_X86_GCC 1  // per-ISA bodies (here and common.cpp's function multiversioning)
// flatten: everything a clone calls (fast_exp, fast_log, the per-block templates) is inlined into
// it, so compiled for its ISA and vectorised with it; left to gcc's inliner, such calls stay out
// of line (baseline x86-64, a scalar loop) once a file has many instantiations.
#ifdef FL_MAX_ISA_AVX2  // FUSEDLOSS_MAX_ISA=avx2 (fusedloss/_extension.py): the AVX2 code, timed
#define FL_MULTIVERSION __attribute__((flatten, target_clones("arch=x86-64-v3", "default")))
#else
#define FL_MULTIVERSION \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#else
#define FL_MULTIVERSION
#endif

// The per-block math is forced inline into each FL_MULTIVERSION clone so that it is compiled for
// that clone's ISA; left as a call it stays baseline x86-64 and its loop does not vectorise.
// (setup.py also sets -fno-trapping-math, for the selects.)
#if defined(__GNUC__)
#define FL_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FL_ALWAYS_INLINE inline
#endif

// exp(x) in fp32 that gcc vectorises (std::exp is not, without -ffast-math): x = n*ln2 + r,
// |r| <= ln2/2 (Cody-Waite, as Cephes' expf), 2^n built in the exponent bits, and for e^r a
// degree-6 minimax polynomial (relative error 2e-9 on that range) in Horner form: at most 1.06
// ulp, as Cephes' degree-7 form's 1.02 (20M sampled x against double exp). exp(x) for x < -87.3
// flushes to 0 (below FLT_MIN); NaN propagates (through p). n is rounded by adding 1.5 * 2^23
// (t then holds n in its low mantissa bits, which shift straight into 2^n's exponent), with no
// round, conversion or NaN select. Counted in gcc 12's AVX-512 loop: 16 vector operations (23
// with those and Cephes' polynomial); 14 with kClampAbove = false (fast_exp_le88), for callers
// whose x is known to be at most 88. exp is most of cross-entropy's CPU forward.
template <bool kClampAbove>
FL_ALWAYS_INLINE float fast_exp_impl(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  // (NaN: the comparison fails and min returns x)
  const float xc = kClampAbove ? std::min(x, 88.37f) : x;
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;  // round(x / ln2), exact in [-126, 127] for the kept x
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.3843602501e-3f;
  p = p * r + 8.3741992712e-3f;
  p = p * r + 4.1668005288e-2f;
  p = p * r + 1.6666430235e-1f;
  p = p * r + 4.9999994040e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(float));
  bits = (bits << 23) + 0x3f800000u;  // (0x400000 + n) << 23 wraps to n << 23: 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return (x < -87.33f) ? 0.0f : p * two_n;  // -inf and below FLT_MIN: 0
}
static inline float fast_exp(float x) { return fast_exp_impl<true>(x); }
// exp(x) for x <= 88 (v - m with m a running max at most 64 below v, or v - lse with lse a row's
// log-sum-exp): larger x gives garbage, not a clamped value or inf; +inf gives NaN.
static inline float fast_exp_le88(float x) { return fast_exp_impl<false>(x); }
// float64 inputs (gradcheck) keep float64 math.
static inline double fast_exp(double x) { return std::exp(x); }
static inline double fast_exp_le88(double x) { return std::exp(x); }

// log(x) in fp32 that gcc vectorises (Cephes' logf polynomial), for finite x >= 0:
// x = m * 2^k with m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial in f = m - 1. About 1 ulp;
// denormals are rescaled first. m and k come from integer arithmetic on x's bits offset by
// sqrt(1/2)'s (as musl's logf): Cephes' "if m < sqrt(1/2): m *= 2, k -= 1" as a select made gcc
// compute the polynomial for both sides and blend (twice the work: AVX2 code, BCE's loss took
// 2.0-2.2 ns per element, 1.25 without). No special cases, which the callers handle as they
// need (KL: y log y): log(0) returns log(2^-150) = -103.97, negative and non-finite x give
// garbage (finite), but a NaN x stays NaN through fast_log1p and the callers' other terms.
// kDenormals = false leaves the rescale out, for callers whose x is known to be >= FLT_MIN.
// (always_inline: with many callers in one file gcc may leave it out of line, unvectorised)
template <bool kDenormals>
FL_ALWAYS_INLINE float fast_log_impl(float x) {
  constexpr int32_t kSqrtHalf = 0x3f3504f3;  // sqrt(1/2)'s bits
  const bool sub = kDenormals && x < 1.17549435e-38f;  // FLT_MIN: rescale denormals
  const float xs = x * (sub ? 8388608.0f : 1.0f);  // * 2^23
  int32_t bits;
  std::memcpy(&bits, &xs, sizeof(float));
  bits -= kSqrtHalf;  // xs / sqrt(1/2) = 2^k * (m / sqrt(1/2)), m / sqrt(1/2) in [1, 2)
  const int32_t k = (bits >> 23) - (sub ? 23 : 0);  // (arithmetic shift: floor)
  bits = (bits & 0x007fffff) + kSqrtHalf;
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float kf = static_cast<float>(k);
  y += kf * -2.12194440e-4f - 0.5f * z;
  return f + y + kf * 0.693359375f;
}
FL_ALWAYS_INLINE float fast_log(float x) { return fast_log_impl<true>(x); }
static inline double fast_log(double x) { return std::log(x); }

// log(1 + x) for x >= 0 without losing small x: u = 1 + x rounds, and log(u) is corrected by
// the first-order term of that rounding, (x - (u - 1)) / u (gives x where u rounds to 1).
// u >= 1: no denormal rescale.
__attribute__((always_inline)) static inline float fast_log1p(float x) {
  const float u = 1.0f + x;
  return fast_log_impl<false>(u) - ((u - 1.0f) - x) / u;
}
static inline double fast_log1p(double x) { return std::log1p(x); }
// fast_log1p for x in [0, 1] given u = 1 + x (rounded) and r = 1 / u, which the caller has for
// its own use (BCE's sigmoid): the correction is a product instead of a second division, and
// u >= 1 needs no denormal rescale.
FL_ALWAYS_INLINE float log1p_unit(float x, float u, float r) {
  return fast_log_impl<false>(u) - ((u - 1.0f) - x) * r;
}
static inline double log1p_unit(double x, double, double) { return std::log1p(x); }

// Accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

static inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// bf16 <-> fp32 one element at a time, in forms gcc vectorises inside a loop (c10's float -> bf16
// tests std::isnan through a branch that stops it): the widening is a shift; the narrowing
// rounds to nearest even in integer selects, NaN kept quiet, as torch's .to() does.
__attribute__((always_inline)) static inline float bf16_to_float(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
__attribute__((always_inline)) static inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // NaN tested as a float (one unordered compare; as bits, |f| > +inf's bits is an unsigned
  // compare, which AVX2 lacks: gcc emitted a min, an equality test and a mask for it)
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// Copy `n` elements at stride `stride` into an accumulation-type buffer.
// Contiguous half-precision runs converted per ISA (common.cpp): as inline templates they were
// compiled for baseline x86-64 only, the bf16/fp16 kernels' bottleneck.
void to_acc(const c10::BFloat16* src, int64_t n, float* dst);
void to_acc(const c10::Half* src, int64_t n, float* dst);
void from_acc(const float* src, int64_t n, c10::BFloat16* dst);
void from_acc(const float* src, int64_t n, c10::Half* dst);
template <typename scalar_t>
constexpr bool is_half_v =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

template <typename scalar_t, typename acc_t>
static inline void load_block(const scalar_t* src, int64_t stride, int64_t n, acc_t* dst) {
  if constexpr (is_half_v<scalar_t>) {
    if (stride == 1) return to_acc(src, n, dst);
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * stride]);
  }
}

template <typename scalar_t, typename acc_t>
static inline void store_block(const acc_t* src, int64_t n, scalar_t* dst, int64_t stride) {
  if constexpr (is_half_v<scalar_t>) {
    if (stride == 1) return from_acc(src, n, dst);
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<scalar_t>(src[i]);
  }
}

// Vectorised block loops (common.cpp), for float and double.
template <typename T> T block_max(const T* x, int64_t n);
// sum_i exp(x[i] - shift)
template <typename T> T block_sum_exp(const T* x, int64_t n, T shift);
// sum_i exp(x[i] - shift) and (into *mx) max_i x[i], in one pass
template <typename T> T block_sum_exp_max(const T* x, int64_t n, T shift, T* mx);
// The same two over bf16 values read in place (fp32 sums)
float block_sum_exp_max(const c10::BFloat16* x, int64_t n, float shift, float* mx);
float block_sum_exp(const c10::BFloat16* x, int64_t n, float shift);
// sum_i x[i] * w[i] (w == nullptr: plain sum)
template <typename T> T block_dot(const T* x, const T* w, int64_t n);

template <typename T>
inline T pairwise_sum(const T* p, int64_t n) {
  if (n <= 8) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += p[i];
    return s;
  }
  const int64_t h = n / 2;
  return pairwise_sum(p, h) + pairwise_sum(p + h, n - h);
}

// Sum of f(i) over [0, n) in kSumLanes accumulators, added pairwise at the end. Not
// `omp simd reduction`: gcc sizes such a loop's reduction lanes for the baseline target before
// target_clones makes the AVX-512 copy (16 lanes of the narrowest type), so a loop reading bf16
// ran at 8 fp32 lanes (ymm) there (a bf16 Huber sum alone, in L1, one thread: 0.186 ns per
// element vs 0.145 with a 32-lane array). An inner loop over a lane array has no such limit:
// each clone picks its own width.
constexpr int kSumLanes = 32;
template <typename A, typename F>
FL_ALWAYS_INLINE A lane_sum(int64_t n, F&& f) {
  A acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) acc[j] += f(i + j);
  }
  A tail = 0;
  for (; i < n; ++i) tail += f(i);
  return pairwise_sum(acc, kSumLanes) + tail;
}

// Online log-sum-exp over blocks: running max m and sum s of exp(x - m). One pass per block: its
// exps are taken against the max so far and its own max found alongside; when the block raises
// the max, s is rescaled once (a factor <= 1), and only a block more than 64 above the max so far
// (exp could leave fp32's range: a first block, or a target far below the rest) is summed again.
// (One pass instead of a max pass and an exp pass: the max pass cost ~14% of the fp32 forward.)
template <typename T>
struct OnlineLSE {
  T m = -std::numeric_limits<T>::infinity();
  T s = 0;
  template <typename X>  // T, or bf16 for T = float
  void add(const X* x, int64_t n) {
    T bm;
    const T bs = block_sum_exp_max(x, n, m, &bm);
    if (!(bm > m)) {  // (also all -inf, NaN left to the sum, as exp-of-NaN gives)
      if (bm != -std::numeric_limits<T>::infinity()) s += bs;
      return;
    }
    if (bm - m <= T(64)) {
      s = (s + bs) * fast_exp(m - bm);
    } else {
      s = s * fast_exp(m - bm) + block_sum_exp(x, n, bm);
    }
    m = bm;
  }
  T lse() const { return m + std::log(s); }
};

// A new uninitialised CPU tensor for a logits-sized result (a gradient). From 8 MiB up its memory is
// reused: the most recently freed such buffer is kept (one) and handed out again for a request it
// fits, up to 1.5x its size. Each fresh large allocation is mapped from the OS, and writing it pays a
// page fault per 4 KiB page (4096x32000 fp32: ~400 ms of faults for ~55 ms of writes, measured);
// a reused buffer's pages are already mapped. (PyTorch's CUDA caching allocator does the same on
// GPUs.) FUSEDLOSS_REUSE_BUFFERS=0 turns it off; release_buffers() frees the kept buffer.
at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options);
int64_t release_buffers();

// Scalar arguments passed as 0-dim device tensors (so that no host sync is needed on CUDA) are
// plain reads on the CPU.
static inline double scalar_or(const c10::optional<at::Tensor>& t, double dflt) {
  return (t.has_value() && t->defined()) ? t->item<double>() : dflt;
}

}  // namespace fusedloss
