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

// ---- Cross-entropy's row loops: sum_i exp(x[i] - shift) (and max_i x[i]), the softmax gradient
//
// Most of cross-entropy's CPU time is the exps of these loops. fast_exp is a chain of about ten
// dependent FMAs per element, long enough that the out-of-order window, not the FMA units, bounded
// the loop (AVX2 code on a Zen 3 core: ~11 cycles per 8 elements for ~21 operations). For AVX2 and
// AVX-512 these loops take exp from exp_lanes instead, written with GCC's vector extensions so that
// both bodies are one source (W = 8 and 16 lanes), bf16 rows widened in registers (no fp32 copy).
// Other CPUs and compilers keep the fast_exp loops.
FL_ALWAYS_INLINE float to_float(float v) { return v; }
FL_ALWAYS_INLINE float to_float(c10::BFloat16 v) { return bf16_to_float(v); }
FL_ALWAYS_INLINE void store_float(float v, float* p) { *p = v; }
FL_ALWAYS_INLINE void store_float(float v, c10::BFloat16* p) {
  *reinterpret_cast<uint16_t*>(p) = float_to_bf16_bits(v);
}

template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
};

// e^d for W lanes, d <= 88 (as fast_exp_le88): n = round(8 d / ln2) = 8 k + j, r = d - n ln2/8
// (two-step Cody-Waite: |r| <= ln2/16), e^d = 2^k 2^(j/8) e^r with 2^(j/8) from an 8-entry table
// held in one register (vpermps reads its index modulo W, so the table repeats for W = 16) and
// e^r = 1 + r + c2 r^2 + c3 r^3 (minimax, relative error 2.7e-8 on that range), folded as
// t + (t r) q with t = 2^k 2^(j/8): 7 multiply-adds and a shorter chain than fast_exp's 10. At
// most 1.6 ulp against double exp over every 7th fp32 d in [-87.33, 88.7] (fast_exp: 1.06).
// exp_lanes gives 0 for d < -87.33 (below FLT_MIN, -inf); exp_lanes_masked leaves those lanes
// unfinished and says which they are (`below`), for a sum that skips them in its add (one masked
// add on AVX-512). NaN stays NaN. (Vectors pass by reference here and below: by value GCC warns,
// -Wpsabi, that their ABI differs without AVX, though all is inlined.)
template <int W>
FL_ALWAYS_INLINE void exp_lanes_masked(const typename Lanes<W>::F& d, typename Lanes<W>::F& e,
                                       typename Lanes<W>::I& below) {
  using F = typename Lanes<W>::F;
  using U = typename Lanes<W>::U;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: t holds n in its low mantissa bits
  constexpr float kTable[8] = {1.0f, 1.0905077457f, 1.1892070770f, 1.2968395948f,
                               1.4142135381f, 1.5422108173f, 1.6817928553f, 1.8340080976f};
  // The table holds 2^(j/8)'s bits less j << 20, so that adding n << 20 = (k << 23) + (j << 20)
  // to an entry gives 2^k 2^(j/8) in one shift and one add (n >> 3 << 23 is two shifts).
  U table;
  for (int i = 0; i < W; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &kTable[i & 7], sizeof(bits));
    table[i] = bits - (uint32_t(i & 7) << 20);
  }
  const F t = d * 11.541560173f + kShift;  // 8 / ln2
  const F n = t - kShift;
  F r = d - n * 0.086669921875f;  // ln2/8 = 0.086669921875 - 2.6524305e-5 (n * hi is exact)
  r = r - n * -2.6524305e-05f;
  // t's bits are 0x4B400000 + n, whose low 12 bits are n's (|n| < 2^11): tb << 20 = n << 20.
  const U tb = (U)t;
  const U tj = __builtin_shuffle(table, tb);  // j = n mod 8 (vpermps: index modulo W)
  const F tk = (F)(tj + (tb << 20));          // 2^k 2^(j/8), k = floor(n / 8) >= -126: normal
  const F q = (r * 0.16664202511f + 0.50006735325f) * r + 1.0f;
  e = (tk * r) * q + tk;
  below = d < -87.33f;  // (NaN: the comparison fails, e is kept)
}
template <int W>
FL_ALWAYS_INLINE void exp_lanes(const typename Lanes<W>::F& d, typename Lanes<W>::F& out) {
  typename Lanes<W>::I below;
  exp_lanes_masked<W>(d, out, below);
  out = (typename Lanes<W>::F)((typename Lanes<W>::I)out & ~below);
}

// Two vectors of W fp32 values from 2W elements: consecutive for float; for bf16 the even and the
// odd elements (one 32-bit lane holds two; a sum and a max do not care about the order).
template <int W>
FL_ALWAYS_INLINE void load_lanes(const float* x, typename Lanes<W>::F& a, typename Lanes<W>::F& b) {
  std::memcpy(&a, x, sizeof(a));
  std::memcpy(&b, x + W, sizeof(b));
}
template <int W>
FL_ALWAYS_INLINE void load_lanes(const c10::BFloat16* x, typename Lanes<W>::F& a,
                                 typename Lanes<W>::F& b) {
  typename Lanes<W>::U u;
  std::memcpy(&u, x, sizeof(u));
  a = (typename Lanes<W>::F)(u << 16);
  b = (typename Lanes<W>::F)(u & 0xffff0000u);
}

// The total of two W-lane accumulators, added pairwise across the lanes.
template <int W>
FL_ALWAYS_INLINE float lanes_total(const typename Lanes<W>::F& s0, const typename Lanes<W>::F& s1) {
  float lanes[W];
  const typename Lanes<W>::F s = s0 + s1;
  std::memcpy(lanes, &s, sizeof(lanes));
  return pairwise_sum(lanes, W);
}

// The last m < 2W elements of a row, copied into pad and padded with -inf, for one more pass of
// the vector body (exp gives 0 there and the max is unchanged): a scalar tail costs a short row
// (C = 33 to a few hundred classes) more than its vector part.
template <int W, typename X>
FL_ALWAYS_INLINE const X* padded_tail(const X* x, int64_t m, X* pad) {
  std::fill_n(pad, 2 * W, X(-std::numeric_limits<float>::infinity()));
  std::copy_n(x, m, pad);
  return pad;
}

// sum_i exp(x[i] - shift) and, if mx, max_i x[i] into *mx; W lanes, two accumulators.
template <int W, bool kMax, typename X>
FL_ALWAYS_INLINE float lse_sum_lanes(const X* x, int64_t n, float shift, float* mx) {
  using F = typename Lanes<W>::F;
  F s0 = {}, s1 = {}, m0 = {}, m1 = {};
  m0 -= std::numeric_limits<float>::infinity();
  m1 = m0;
  X pad[2 * W];
  for (int64_t i = 0; i < n; i += 2 * W) {
    const X* xi = n - i >= 2 * W ? x + i : padded_tail<W>(x + i, n - i, pad);
    F a, b, ea, eb;
    typename Lanes<W>::I za, zb;
    load_lanes<W>(xi, a, b);
    exp_lanes_masked<W>(a - shift, ea, za);
    exp_lanes_masked<W>(b - shift, eb, zb);
    s0 = za ? s0 : s0 + ea;
    s1 = zb ? s1 : s1 + eb;
    if (kMax) {
      m0 = a > m0 ? a : m0;
      m1 = b > m1 ? b : m1;
    }
  }
  if (kMax) {
    float m = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < W; ++j) m = m0[j] > m ? m0[j] : m;
    for (int j = 0; j < W; ++j) m = m1[j] > m ? m1[j] : m;
    *mx = m;
  }
  return lanes_total<W>(s0, s1);
}

// fp32 bits plus the round-to-nearest-even bias: the high 16 bits are the bf16 bits (NaN aside).
template <int W>
FL_ALWAYS_INLINE void bf16_biased_lanes(const typename Lanes<W>::U& u, typename Lanes<W>::U& out) {
  out = u + 0x7FFFu + ((u >> 16) & 1u);
}

// fp32 bits -> bf16 bits (round to nearest even, NaN kept quiet), as float_to_bf16_bits per lane.
template <int W>
FL_ALWAYS_INLINE void bf16_bits_lanes(const typename Lanes<W>::F& f, typename Lanes<W>::U& out) {
  using U = typename Lanes<W>::U;
  const U nan = (U)(f != f);
  bf16_biased_lanes<W>((U)f, out);
  out = ((out >> 16) & ~nan) | (nan & 0x7FC0u);
}

// Two vectors of fp32 bits rounded to bf16 (to nearest even) as one vector of pairs, the even
// elements in the low halves (load_lanes' order), without bf16_bits_lanes' NaN case: for a NaN
// whose low 16 bits are 0, as every NaN from bf16 logits is (operations keep an operand NaN's
// payload, and x86's own NaN is 0xFFC00000), the bias does not carry and the result is a NaN.
template <int W>
FL_ALWAYS_INLINE void bf16_pairs_lanes(const typename Lanes<W>::U& ea, const typename Lanes<W>::U& od,
                                       typename Lanes<W>::U& out) {
  typename Lanes<W>::U ra, rb;
  bf16_biased_lanes<W>(ea, ra);
  bf16_biased_lanes<W>(od, rb);
  out = (ra >> 16) | (rb & 0xFFFF0000u);
}

// Two vectors of fp32 values stored as 2W elements, in load_lanes' order. finite: every NaN of
// ga and gb comes from a bf16 input or from x86 itself (bf16_pairs_lanes' condition).
template <int W, typename X>
FL_ALWAYS_INLINE void store_lanes(const typename Lanes<W>::F& ga, const typename Lanes<W>::F& gb,
                                  bool finite, X* g) {
  using U = typename Lanes<W>::U;
  if constexpr (std::is_same_v<X, float>) {
    std::memcpy(g, &ga, sizeof(ga));
    std::memcpy(g + W, &gb, sizeof(gb));
  } else {
    U pair;
    if (finite) {
      bf16_pairs_lanes<W>((U)ga, (U)gb, pair);
    } else {
      U ra, rb;
      bf16_bits_lanes<W>(ga, ra);
      bf16_bits_lanes<W>(gb, rb);
      pair = ra | (rb << 16);
    }
    std::memcpy(g, &pair, sizeof(pair));
  }
}

// The softmax gradient without class weights: g = scale * (a exp(x - lse) - k), W lanes; returns
// the sum of exp(x - lse). bf16 rows read and written in place (x == g allowed: each pair of
// elements is read before it is written).
template <int W, typename X>
FL_ALWAYS_INLINE float softmax_grad_lanes(const X* x, int64_t n, float lse, float a, float k,
                                          float scale, X* g) {
  using F = typename Lanes<W>::F;
  // With lse and the factors finite, g's NaNs are x's or x86's own (see bf16_pairs_lanes).
  const bool finite =
      std::isfinite(lse) && std::isfinite(a) && std::isfinite(k) && std::isfinite(scale);
  F s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    F xa, xb, pa, pb;
    load_lanes<W>(x + i, xa, xb);
    exp_lanes<W>(xa - lse, pa);
    exp_lanes<W>(xb - lse, pb);
    s0 += pa;
    s1 += pb;
    store_lanes<W>(scale * (pa * a - k), scale * (pb * a - k), finite, g + i);
  }
  // (a scalar tail: padding it as lse_sum_lanes does cost more here, three copies, than it saved)
  float s = 0;
  for (; i < n; ++i) {
    const float p = fast_exp_le88(to_float(x[i]) - lse);
    s += p;
    store_float(scale * (p * a - k), g + i);
  }
  return lanes_total<W>(s0, s1) + s;
}

// The same with fast_exp (CPUs without AVX2, other compilers); bf16 widened in place, in lane
// arrays as lane_sum (common.h) and for the same reason.
template <bool kMax, typename X>
FL_ALWAYS_INLINE float lse_sum_portable(const X* x, int64_t n, float shift, float* mx) {
  float s[kSumLanes] = {};
  float m[kSumLanes];
  std::fill_n(m, kSumLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) {
      const float v = to_float(x[i + j]);
      s[j] += fast_exp_le88(v - shift);
      if (kMax) m[j] = v > m[j] ? v : m[j];
    }
  }
  float st = 0, mt = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    st += fast_exp_le88(v - shift);
    mt = v > mt ? v : mt;
  }
  if (kMax) {
    for (int j = 0; j < kSumLanes; ++j) mt = m[j] > mt ? m[j] : mt;
    *mx = mt;
  }
  return pairwise_sum(s, kSumLanes) + st;
}

// The softmax gradient with fast_exp, and where a class weight enters (w: - k w_j); bf16 rows
// read and written in place as in softmax_grad_lanes, fp32 math and the same rounding to bf16 as
// from_acc; the sum of p in lane arrays as lane_sum.
template <typename X>
FL_ALWAYS_INLINE float softmax_grad_portable(const X* x, const float* w, int64_t n, float lse,
                                             float a, float k, float scale, X* g) {
  if (w == nullptr) {
    return lane_sum<float>(n, [&](int64_t i) {
      const float p = fast_exp_le88(to_float(x[i]) - lse);
      store_float(scale * (p * a - k), g + i);
      return p;
    });
  }
  return lane_sum<float>(n, [&](int64_t i) {
    const float p = fast_exp_le88(to_float(x[i]) - lse);
    store_float(scale * (p * a - k * w[i]), g + i);
    return p;
  });
}

// ---- Row sweeps (rows.h): a tile of whole rows, one row at a time --------------------------------
//
// A row of 2W to kRowSweepMaxC classes is read in steps of 2W elements (load_lanes), twice from
// L1: its max, then the sum of exp(x - max) without the target (or the gradient). The last C % 2W
// elements are a step that ends at the row's end and overlaps the one before, its lanes already
// done masked out, rather than a scalar tail or a padded copy. The row statistics are finished by
// the caller, vectorised across rows (row_finish), not one scalar row at a time. Rows of at least
// 2W classes (kRowSweepMinC); shorter ones are the class sweeps' (a padded copy per row was 2x
// slower than those at C = 4 to 24: AVX-512, the kernels alone).

// Element index, within a step, of each lane of load_lanes' two vectors.
template <int W, typename X>
FL_ALWAYS_INLINE void step_lanes(typename Lanes<W>::I& ia, typename Lanes<W>::I& ib) {
  for (int j = 0; j < W; ++j) {
    ia[j] = std::is_same_v<X, float> ? j : 2 * j;
    ib[j] = std::is_same_v<X, float> ? W + j : 2 * j + 1;
  }
}

// Horizontal max and sum of W lanes by halving: log2(W) shuffles (constant indices, j ^ h) and
// operations, for a reduction per row.
template <int W, int H, int... J>
FL_ALWAYS_INLINE void lanes_swap(const typename Lanes<W>::F& v, std::integer_sequence<int, J...>,
                                 typename Lanes<W>::F& out) {
  out = __builtin_shuffle(v, typename Lanes<W>::I{(J ^ H)...});
}
template <int W, int H = W / 2>
FL_ALWAYS_INLINE float lanes_hmax(const typename Lanes<W>::F& v) {
  typename Lanes<W>::F p;
  lanes_swap<W, H>(v, std::make_integer_sequence<int, W>{}, p);
  const typename Lanes<W>::F m = p > v ? p : v;
  if constexpr (H == 1) {
    return m[0];
  } else {
    return lanes_hmax<W, H / 2>(m);
  }
}
template <int W, int H = W / 2>
FL_ALWAYS_INLINE float lanes_hsum(const typename Lanes<W>::F& v) {
  typename Lanes<W>::F s;
  lanes_swap<W, H>(v, std::make_integer_sequence<int, W>{}, s);
  s += v;
  if constexpr (H == 1) {
    return s[0];
  } else {
    return lanes_hsum<W, H / 2>(s);
  }
}

// The steps of a row of C >= 2W classes: `full` elements in whole steps from 0, then if
// C % 2W != 0 the overlapping step at C - 2W (`tail`), whose lanes below `full` are done already.
template <int W, typename X>
struct RowSteps {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  static constexpr int64_t K = 2 * W;
  I ia, ib;
  F new_a, new_b;  // the tail step's lanes: 1 where not done already, else 0
  int64_t full, tail;
  explicit RowSteps(int64_t C) : full(C / K * K), tail(full < C ? C - K : -1) {
    step_lanes<W, X>(ia, ib);
    // (a product, not a select: GCC 12 hoists a loop-invariant compare out of the loops and
    // keeps its AVX-512 result as a vector, then selects with it one lane at a time)
    for (int j = 0; j < W; ++j) {
      new_a[j] = tail + ia[j] >= full ? 1.0f : 0.0f;
      new_b[j] = tail + ib[j] >= full ? 1.0f : 0.0f;
    }
  }
  // ea, eb (values in [0, 1] or NaN) of the step at o with class y's lane set to 0, and in the
  // tail step the lanes done already (a NaN there was counted already).
  template <bool kTail>
  void drop(int64_t o, int32_t y, F& ea, F& eb) const {
    const I yo = I{} + (y - static_cast<int32_t>(o));
    ea = ia == yo ? F{} : ea;
    eb = ib == yo ? F{} : eb;
    if constexpr (kTail) {
      ea *= new_a;
      eb *= new_b;
    }
  }
};

// Per row r of n (row r at x + r ld, C classes): m[r] = its max and s[r] = the sum of exp(x - m)
// over its classes other than tv[r] (tv < 0: all).
template <int W, typename X>
FL_ALWAYS_INLINE void rows_lse_lanes(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                                     float* m_out, float* s_out) {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  const RowSteps<W, X> R(C);
  for (int64_t r = 0; r < n; ++r) {
    const X* xr = x + r * ld;
    F m0 = {}, m1 = {}, a, b;
    m0 -= std::numeric_limits<float>::infinity();
    m1 = m0;
    for (int64_t o = 0; o < R.full; o += R.K) {
      load_lanes<W>(xr + o, a, b);
      m0 = a > m0 ? a : m0;
      m1 = b > m1 ? b : m1;
    }
    F ta = {}, tb = {};
    if (R.tail >= 0) {
      load_lanes<W>(xr + R.tail, ta, tb);
      m0 = ta > m0 ? ta : m0;
      m1 = tb > m1 ? tb : m1;
    }
    const float mx = lanes_hmax<W>(m0 > m1 ? m0 : m1);
    const int32_t y = static_cast<int32_t>(tv[r]);
    F s0 = {}, s1 = {}, ea, eb;
    I za, zb;
    for (int64_t o = 0; o < R.full; o += R.K) {
      load_lanes<W>(xr + o, a, b);
      exp_lanes_masked<W>(a - mx, ea, za);
      exp_lanes_masked<W>(b - mx, eb, zb);
      R.template drop<false>(o, y, ea, eb);
      s0 = za ? s0 : s0 + ea;
      s1 = zb ? s1 : s1 + eb;
    }
    if (R.tail >= 0) {
      exp_lanes_masked<W>(ta - mx, ea, za);
      exp_lanes_masked<W>(tb - mx, eb, zb);
      R.template drop<true>(R.tail, y, ea, eb);
      s0 = za ? s0 : s0 + ea;
      s1 = zb ? s1 : s1 + eb;
    }
    m_out[r] = mx;
    s_out[r] = lanes_hsum<W>(s0 + s1);
  }
}

// Per row r of n with tv[r] >= 0: g = a[r] p - b[r] w (b null: no such term; w null: w = 1) with
// p = exp(x - lse[r]), written through g + r gld (gld may be ld and g x: in place), and q[r] = the
// sum of p over the classes other than tv[r]; the target column is left to the caller. Rows with
// tv[r] < 0 are not written (q[r] = 0). w only with float rows.
template <int W, typename X>
FL_ALWAYS_INLINE void rows_grad_lanes(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                                      const float* lse, const float* a, const float* b,
                                      const float* w, X* g, int64_t gld, float* q) {
  using F = typename Lanes<W>::F;
  const RowSteps<W, X> R(C);
  for (int64_t r = 0; r < n; ++r) {
    q[r] = 0;
    const int32_t y = static_cast<int32_t>(tv[r]);
    if (y < 0) continue;
    const float l = lse[r], ar = a[r], br = b ? b[r] : 0.0f;
    const bool finite = std::isfinite(l) && std::isfinite(ar) && std::isfinite(br);
    const X* xr = x + r * ld;
    X* gr = g + r * gld;
    // The overlapping step is read before any store: in place, the steps before it overwrite
    // some of its elements (with the values it stores again).
    F ta = {}, tb = {};
    if (R.tail >= 0) load_lanes<W>(xr + R.tail, ta, tb);
    F q0 = {}, q1 = {}, xa, xb, pa, pb, wa = {}, wb;
    wa += 1.0f;
    wb = wa;
    for (int64_t o = 0; o < R.full; o += R.K) {
      load_lanes<W>(xr + o, xa, xb);
      exp_lanes<W>(xa - l, pa);
      exp_lanes<W>(xb - l, pb);
      if (w) load_lanes<W>(w + o, wa, wb);
      store_lanes<W>(ar * pa - br * wa, ar * pb - br * wb, finite, gr + o);
      R.template drop<false>(o, y, pa, pb);
      q0 += pa;
      q1 += pb;
    }
    if (R.tail >= 0) {
      exp_lanes<W>(ta - l, pa);
      exp_lanes<W>(tb - l, pb);
      if (w) load_lanes<W>(w + R.tail, wa, wb);
      store_lanes<W>(ar * pa - br * wa, ar * pb - br * wb, finite, gr + R.tail);
      R.template drop<true>(R.tail, y, pa, pb);
      q0 += pa;
      q1 += pb;
    }
    q[r] = lanes_hsum<W>(q0 + q1);
  }
}

// The same with fast_exp (CPUs without AVX2, other compilers), row by row.
template <typename X>
FL_ALWAYS_INLINE void rows_lse_portable(const X* x, int64_t ld, int64_t C, int64_t n,
                                        const float* tv, float* m_out, float* s_out) {
  for (int64_t r = 0; r < n; ++r) {
    const X* xr = x + r * ld;
    const int64_t y = static_cast<int64_t>(tv[r]);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < C; ++c) m = std::max(m, to_float(xr[c]));
    float s = 0;
    for (int64_t c = 0; c < C; ++c) s += c == y ? 0.0f : fast_exp_le88(to_float(xr[c]) - m);
    m_out[r] = m;
    s_out[r] = s;
  }
}
template <typename X>
FL_ALWAYS_INLINE void rows_grad_portable(const X* x, int64_t ld, int64_t C, int64_t n,
                                         const float* tv, const float* lse, const float* a,
                                         const float* b, const float* w, X* g, int64_t gld,
                                         float* q) {
  for (int64_t r = 0; r < n; ++r) {
    q[r] = 0;
    const int64_t y = static_cast<int64_t>(tv[r]);
    if (y < 0) continue;
    const X* xr = x + r * ld;
    X* gr = g + r * gld;
    const float br = b ? b[r] : 0.0f;
    float s = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float p = fast_exp_le88(to_float(xr[c]) - lse[r]);
      s += c == y ? 0.0f : p;
      store_float(a[r] * p - br * (w ? w[c] : 1.0f), gr + c);
    }
    q[r] = s;
  }
}

// W lanes of exp_lanes, or W = 0: the fast_exp loops. mx == nullptr: no max.
template <int W, typename X>
FL_ALWAYS_INLINE float lse_sum_at(const X* x, int64_t n, float shift, float* mx) {
  if constexpr (W == 0) {
    return mx ? lse_sum_portable<true>(x, n, shift, mx) : lse_sum_portable<false>(x, n, shift, mx);
  } else {
    return mx ? lse_sum_lanes<W, true>(x, n, shift, mx) : lse_sum_lanes<W, false>(x, n, shift, mx);
  }
}
template <int W, typename X>
FL_ALWAYS_INLINE float softmax_grad_at(const X* x, const float* w, int64_t n, float lse, float a,
                                       float k, float scale, X* g) {
  if constexpr (W > 0) {
    if (w == nullptr) return softmax_grad_lanes<W>(x, n, lse, a, k, scale, g);
  }
  return softmax_grad_portable(x, w, n, lse, a, k, scale, g);
}

// The four, for float and bf16 rows, compiled per ISA by function multiversioning (the loader
// picks the body for the CPU, as for FL_MULTIVERSION's clones; FUSEDLOSS_MAX_ISA=avx2 leaves
// AVX-512 out).
template <int W, typename X>
FL_ALWAYS_INLINE void rows_lse_at(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                                  float* m, float* s) {
  if constexpr (W == 0) {
    rows_lse_portable(x, ld, C, n, tv, m, s);
  } else {
    rows_lse_lanes<W>(x, ld, C, n, tv, m, s);
  }
}
template <int W, typename X>
FL_ALWAYS_INLINE void rows_grad_at(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                                   const float* lse, const float* a, const float* b,
                                   const float* w, X* g, int64_t gld, float* q) {
  if constexpr (W == 0) {
    rows_grad_portable(x, ld, C, n, tv, lse, a, b, w, g, gld, q);
  } else {
    rows_grad_lanes<W>(x, ld, C, n, tv, lse, a, b, w, g, gld, q);
  }
}

#define FL_ROW_SWEEPS(ATTR, W, X)                                                               \
  ATTR void row_sweep_lse(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,        \
                          float* m, float* s) {                                                 \
    rows_lse_at<W>(x, ld, C, n, tv, m, s);                                                      \
  }                                                                                             \
  ATTR void row_sweep_grad(const X* x, int64_t ld, int64_t C, int64_t n, const float* tv,       \
                           const float* lse, const float* a, const float* b, const float* w,    \
                           X* g, int64_t gld, float* q) {                                       \
    rows_grad_at<W>(x, ld, C, n, tv, lse, a, b, w, g, gld, q);                                  \
  }
#define FL_ROW_SUMS(ATTR, W)                                                                    \
  FL_ROW_SWEEPS(ATTR, W, float)                                                                 \
  FL_ROW_SWEEPS(ATTR, W, c10::BFloat16)                                                         \
  ATTR float lse_sum(const float* x, int64_t n, float shift, float* mx) {                       \
    return lse_sum_at<W>(x, n, shift, mx);                                                      \
  }                                                                                             \
  ATTR float lse_sum(const c10::BFloat16* x, int64_t n, float shift, float* mx) {               \
    return lse_sum_at<W>(x, n, shift, mx);                                                      \
  }                                                                                             \
  ATTR float softmax_grad(const float* x, const float* w, int64_t n, float lse, float a,        \
                          float k, float scale, float* g) {                                     \
    return softmax_grad_at<W>(x, w, n, lse, a, k, scale, g);                                    \
  }                                                                                             \
  ATTR float softmax_grad(const c10::BFloat16* x, const float* w, int64_t n, float lse,         \
                          float a, float k, float scale, c10::BFloat16* g) {                    \
    return softmax_grad_at<W>(x, w, n, lse, a, k, scale, g);                                    \
  }
#ifdef FL_X86_GCC
FL_ROW_SUMS(__attribute__((target("default"))), 0)
FL_ROW_SUMS(__attribute__((target("arch=x86-64-v3"))), 8)
#ifndef FL_MAX_ISA_AVX2
FL_ROW_SUMS(__attribute__((target("arch=x86-64-v4"))), 16)
#endif
#else
FL_ROW_SUMS(, 0)
#endif
#undef FL_ROW_SUMS
#undef FL_ROW_SWEEPS

}  // namespace

void rows_lse(const float* x, int64_t ld, int64_t C, int64_t n, const float* tv, float* m,
              float* s) {
  TORCH_CHECK(C >= kRowSweepMinC, "rows sweeps: rows of at least ", kRowSweepMinC, " classes");
  row_sweep_lse(x, ld, C, n, tv, m, s);
}
void rows_lse(const c10::BFloat16* x, int64_t ld, int64_t C, int64_t n, const float* tv, float* m,
              float* s) {
  TORCH_CHECK(C >= kRowSweepMinC, "rows sweeps: rows of at least ", kRowSweepMinC, " classes");
  row_sweep_lse(x, ld, C, n, tv, m, s);
}
void rows_softmax_grad(const float* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                       const float* lse, const float* a, const float* b, const float* w, float* g,
                       int64_t gld, float* q) {
  TORCH_CHECK(C >= kRowSweepMinC, "rows sweeps: rows of at least ", kRowSweepMinC, " classes");
  row_sweep_grad(x, ld, C, n, tv, lse, a, b, w, g, gld, q);
}
void rows_softmax_grad(const c10::BFloat16* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                       const float* lse, const float* a, const float* b, const float* w,
                       c10::BFloat16* g, int64_t gld, float* q) {
  TORCH_CHECK(C >= kRowSweepMinC, "rows sweeps: rows of at least ", kRowSweepMinC, " classes");
  TORCH_CHECK(w == nullptr, "rows_softmax_grad: class weights need float rows");
  row_sweep_grad(x, ld, C, n, tv, lse, a, b, w, g, gld, q);
}

float block_softmax_grad(const float* x, const float* w, int64_t n, float lse, float a, float k,
                         float scale, float* g) {
  return softmax_grad(x, w, n, lse, a, k, scale, g);
}
float block_softmax_grad(const c10::BFloat16* x, const float* w, int64_t n, float lse, float a,
                         float k, float scale, c10::BFloat16* g) {
  return softmax_grad(x, w, n, lse, a, k, scale, g);
}
double block_softmax_grad(const double* x, const double* w, int64_t n, double lse, double a,
                          double k, double scale, double* g) {
  return softmax_grad_impl(x, w, n, lse, a, k, scale, g);
}

FL_MULTIVERSION void to_acc(const c10::BFloat16* s, int64_t n, float* d) { to_acc_impl(s, n, d); }
FL_MULTIVERSION void to_acc(const c10::Half* s, int64_t n, float* d) { to_acc_impl(s, n, d); }
FL_MULTIVERSION void from_acc(const float* s, int64_t n, c10::BFloat16* d) { from_acc_impl(s, n, d); }
FL_MULTIVERSION void from_acc(const float* s, int64_t n, c10::Half* d) { from_acc_impl(s, n, d); }

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
template <> float block_sum_exp(const float* x, int64_t n, float s) {
  return lse_sum(x, n, s, nullptr);
}
template <> double block_sum_exp(const double* x, int64_t n, double s) { return sum_exp_impl(x, n, s); }
template <> float block_sum_exp_max(const float* x, int64_t n, float s, float* mx) {
  return lse_sum(x, n, s, mx);
}
float block_sum_exp_max(const c10::BFloat16* x, int64_t n, float s, float* mx) {
  return lse_sum(x, n, s, mx);
}
float block_sum_exp(const c10::BFloat16* x, int64_t n, float s) {
  return lse_sum(x, n, s, nullptr);
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
