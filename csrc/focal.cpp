// Focal losses on the CPU, one pass over the inputs, loss and gradient together.
//
// Sigmoid focal (element-wise, torchvision.ops.sigmoid_focal_loss), x logit, y target in [0, 1]:
//   L = alpha_t * ce * q^gamma,  ce = BCE-with-logits(x, y),  q = 1 - p_t = y (1-p) + (1-y) p
// Every term is built from e = exp(-|x|) (never overflows) and, with u the weight of the small
// sigmoid (u = 1-y for x >= 0, y for x < 0) and v = 1 - u:
//   ce = |x| u + log1p(e),   q = (u + v e) / (1 + e)   (q directly, never 1 - p_t)
// dL/dx = alpha_t [ (p - y) q^gamma + ce * gamma q^(gamma-1) dq/dx ],  dq/dx = (1 - 2y) p (1-p).
// q^(gamma-1) is infinite at q = 0 for gamma < 1, so it is never formed: with
//   r = p (1-p) / q = e / ((1 + e)(u + v e))   (in [0, 1]: q >= min(p, 1-p) >= p (1-p))
// the gradient is alpha_t q^gamma * s(x) * [ (u - v e)/(1 + e) + gamma (u - v) r ce ], s = sign(x),
// since p - y = s (u - v e)/(1 + e) and 1 - 2y = s (u - v). u + v e = 0 (q = 0) only where e
// underflows on a hard target (u = 0, v = 1); there ce = 0 and both terms vanish, so any finite r
// (and q^gamma) will do.
//
// Softmax focal (per row, class-index target t): lp = log p_t = -(lse - x_t), q = 1 - p_t, both
// from rows.h's one-read statistics (no cancellation on confident rows),
//   L = -alpha_t q^gamma lp,   dL/dx_j = dL/dlp * ([j == t] - p_j).
// dL/dlp = -alpha_t [ q^gamma - gamma q^(gamma-1) p_t lp ]
//        = -alpha_t q^gamma [1 - gamma p_t (lp/q)]
// and lp/q = log(1-q)/q lies in (-inf, -1], -> -1 as q -> 0: q^(gamma-1) is never formed. With
// A = -dL/dlp >= 0 the gradient has cross-entropy's shape: A p_j off the target, -A q on it.
// Rows go through rows.h's shared row statistics and gradient sweep; (N, C, H, W) inputs and
// (N, C) inputs with few classes are swept by tiles instead (rows.h, softmax_focal_tiles), with
// the same per-row statistics.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "rows.h"

namespace fusedloss {
namespace {

// The per-block math is forced inline into each FL_MULTIVERSION clone, so that each ISA gets its
// own vectorised loop (a call would stay baseline x86-64).
#define FOCAL_INLINE __attribute__((always_inline)) inline

// Elements per partial sum when the sigmoid loss is reduced (kernels/focal.py CHUNK).
constexpr int64_t kChunk = 4096;

// q^gamma: kPow exp(gamma log q) for gamma > 0 (log 0 = -inf gives 0), kZero 1 (gamma = 0,
// where 0 * log 0 would be NaN), kSquare q * q (the common gamma = 2, no log/exp).
enum PowMode { kPow, kZero, kSquare };

// Written without branches around divisions or comparisons, which gcc would not if-convert
// (they may trap), so that the loop vectorises.
template <PowMode kMode, bool kGrad, typename T>
FOCAL_INLINE T sigmoid_focal_impl(const T* x, const T* y, int64_t n, T alpha, T gamma, T scale,
                                T* loss, T* g) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], yi = y[i];
    const T a = std::abs(xi);
    const T e = fast_exp(-a);
    const T ope = T(1) + e;
    const bool pos = xi >= 0;
    const T u = pos ? T(1) - yi : yi;
    const T v = pos ? yi : T(1) - yi;
    const T d = u + v * e;
    const T q = d / ope;
    const T qg = kMode == kSquare ? q * q : kMode == kZero ? T(1) : fast_exp(gamma * fast_log(q));
    const T ce = a * u + fast_log1p(e);
    const T at = alpha < 0 ? T(1) : alpha * yi + (T(1) - alpha) * (T(1) - yi);
    const T l = at * ce * qg;
    loss[i] = l;
    total += l;
    if (kGrad) {
      // d = 0 only where e = 0 and u = 0, and there r's factor ce is 0: any finite r will do.
      const T r = e / (ope * std::max(d, std::numeric_limits<T>::min()));
      const T b = (u - v * e) / ope + gamma * (u - v) * r * ce;
      g[i] = scale * at * qg * (pos ? b : -b);
    }
  }
  return total;
}

template <PowMode kMode, typename T>
FOCAL_INLINE T sigmoid_focal_grad_or_not(const T* x, const T* y, int64_t n, T alpha, T gamma,
                                       T scale, T* loss, T* g) {
  return g ? sigmoid_focal_impl<kMode, true>(x, y, n, alpha, gamma, scale, loss, g)
           : sigmoid_focal_impl<kMode, false>(x, y, n, alpha, gamma, scale, loss, g);
}
template <typename T>
FOCAL_INLINE T sigmoid_focal_dispatch(const T* x, const T* y, int64_t n, T alpha, T gamma,
                                    T scale, T* loss, T* g) {
  if (gamma == T(2)) {
    return sigmoid_focal_grad_or_not<kSquare>(x, y, n, alpha, gamma, scale, loss, g);
  }
  if (gamma == T(0)) return sigmoid_focal_grad_or_not<kZero>(x, y, n, alpha, gamma, scale, loss, g);
  return sigmoid_focal_grad_or_not<kPow>(x, y, n, alpha, gamma, scale, loss, g);
}
FL_MULTIVERSION float sigmoid_focal_block(const float* x, const float* y, int64_t n, float alpha,
                                          float gamma, float scale, float* loss, float* g) {
  return sigmoid_focal_dispatch(x, y, n, alpha, gamma, scale, loss, g);
}
double sigmoid_focal_block(const double* x, const double* y, int64_t n, double alpha,
                           double gamma, double scale, double* loss, double* g) {
  return sigmoid_focal_dispatch(x, y, n, alpha, gamma, scale, loss, g);
}

// The per-pixel terms of a tile, vectorised: the same as focal_row below, from the max m, the
// sum s of exp(x - m) over the non-target classes, x at the target xt and alpha_t at (0 for
// ignored pixels). m becomes the lse, s the q. Logs of values clamped to the smallest normal keep
// gamma = 0 and q = 0 finite.
template <bool kSquare, typename T>
FOCAL_INLINE void tile_terms_impl(int64_t n, const T* xt, const T* at, T gamma, T scale, T* m,
                                  T* s, T* loss, T* a) {
  constexpr T tiny = std::numeric_limits<T>::min();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const RowStats<T> st = row_finish(m[i], s[i], xt[i]);
    const T lp = -st.nll, q = st.q;
    const T qg = kSquare ? q * q : fast_exp(gamma * fast_log(std::max(q, tiny)));
    const T ratio = q > 0 ? lp / (q > 0 ? q : T(1)) : T(-1);  // log(1-q)/q -> -1 as q -> 0
    m[i] = st.lse;
    s[i] = q;
    loss[i] = -at[i] * qg * lp;
    a[i] = scale * at[i] * qg * (T(1) - gamma * fast_exp(lp) * ratio);
  }
}
template <typename T>
FOCAL_INLINE void tile_terms_dispatch(int64_t n, const T* xt, const T* at, T gamma, T scale, T* m,
                                      T* s, T* loss, T* a) {
  if (gamma == T(2)) {
    tile_terms_impl<true>(n, xt, at, gamma, scale, m, s, loss, a);
  } else {
    tile_terms_impl<false>(n, xt, at, gamma, scale, m, s, loss, a);
  }
}
FL_MULTIVERSION void tile_terms(int64_t n, const float* xt, const float* at, float gamma,
                                float scale, float* m, float* s, float* loss, float* a) {
  tile_terms_dispatch(n, xt, at, gamma, scale, m, s, loss, a);
}
void tile_terms(int64_t n, const double* xt, const double* at, double gamma, double scale,
                double* m, double* s, double* loss, double* a) {
  tile_terms_dispatch(n, xt, at, gamma, scale, m, s, loss, a);
}

// One row's focal terms from its statistics (see the header): the loss, and
// A = scale * alpha_t q^gamma (1 - gamma p_t lp/q); the gradient is A p_j off the target and
// -A q on it.
template <typename T>
struct FocalRow {
  T loss, a;
};
template <typename T>
inline FocalRow<T> focal_row(const RowStats<T>& st, T alpha_t, T gamma, T scale) {
  const T lp = -st.nll, q = st.q;
  const T qg = gamma == 2 ? q * q : std::pow(q, gamma);  // pow(0, 0) = 1
  const T ratio = q > 0 ? lp / q : T(-1);  // log(1-q)/q -> -1 as q -> 0
  return {-alpha_t * qg * lp, scale * alpha_t * qg * (1 - gamma * std::exp(lp) * ratio)};
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_fwd(const at::Tensor& input,
                                                     const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& grad_scale,
                                                     double alpha, double gamma, bool reduce,
                                                     bool compute_grad) {
  TORCH_CHECK(input.is_contiguous() && target.is_contiguous() &&
                  target.scalar_type() == input.scalar_type() &&
                  target.sizes() == input.sizes(),
              "fusedloss::sigmoid_focal: input and target must be contiguous, of one shape and "
              "dtype");
  TORCH_CHECK(gamma >= 0, "fusedloss::sigmoid_focal: gamma must be >= 0");
  TORCH_CHECK(!grad_scale.has_value() || grad_scale->numel() == 1,
              "fusedloss::sigmoid_focal: grad_scale must be a scalar");
  const int64_t n = input.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto opts = input.options().dtype(acc_dtype(input));
  at::Tensor loss = reduce ? at::empty({chunks}, opts) : at::empty(input.sizes(), opts);
  at::Tensor grad = compute_grad ? empty_reused(input.sizes(), input.options())
                                 : at::empty({0}, input.options());
  const auto dtype = input.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedloss_sfl", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const scalar_t* yp = target.const_data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    acc_t* lp = loss.data_ptr<acc_t>();
    const acc_t a = static_cast<acc_t>(alpha), gm = static_cast<acc_t>(gamma);
    const acc_t scale = static_cast<acc_t>(scalar_or(grad_scale, 1.0));
    at::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
      acc_t xb[kBlock], yb[kBlock], lb[kBlock], gb[kBlock];
      for (int64_t c = begin; c < end; ++c) {
        acc_t total = 0;
        const int64_t stop = std::min(n, (c + 1) * kChunk);
        for (int64_t i0 = c * kChunk; i0 < stop; i0 += kBlock) {
          const int64_t nb = std::min(kBlock, stop - i0);
          load_block(xp + i0, 1, nb, xb);
          load_block(yp + i0, 1, nb, yb);
          total += sigmoid_focal_block(xb, yb, nb, a, gm, scale, lb, gp ? gb : nullptr);
          if (!reduce) std::memcpy(lp + i0, lb, nb * sizeof(acc_t));
          if (gp) store_block(gb, nb, gp + i0, 1);
        }
        if (reduce) lp[c] = total;
      }
    });
  });
  return {loss, grad};
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void softmax_focal_rows(const at::Tensor& x, Targets& T, const acc_t* alpha, acc_t gamma,
                        acc_t scale, scalar_t* g, at::IntArrayRef g_strides, acc_t* loss) {
  const RowGeom<scalar_t> R(x);
  const int64_t gN = g ? g_strides[0] : 0, gC = g ? g_strides[1] : 0, gD = g ? g_strides[2] : 0;
  at::parallel_for(0, R.rows(), R.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    acc_t gbuf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gr = g ? g + (r / R.D) * gN + (r % R.D) * gD : nullptr;
      const int64_t t = T(r);
      if (t < 0) {
        loss[r] = 0;
        if (gr) {
          for (int64_t c = 0; c < R.C; ++c) gr[c * gC] = scalar_t(0);
        }
        continue;
      }
      const scalar_t* xr = R.row(r);
      const RowStats<acc_t> st = row_stats(xr, R.sC, R.C, t, (const acc_t*)nullptr,
                                           (acc_t*)nullptr, buf);
      const FocalRow<acc_t> f = focal_row(st, alpha ? alpha[t] : acc_t(1), gamma, scale);
      loss[r] = f.loss;
      if (!gr) continue;
      row_grad(xr, R.sC, R.C, t, st.lse, f.a, acc_t(0), (const acc_t*)nullptr, acc_t(1), gr, gC,
               buf, gbuf);
      gr[t * gC] = static_cast<scalar_t>(-f.a * st.q);
    }
  });
}

// Tiles (rows.h: (N, C, H, W) pixels, or (N, C) rows with few classes): max, then sum of
// exp(x - max) (the tile stays in cache), then per lane the row terms (tile_terms), then the
// gradient class by class. Same math as the rows above.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void softmax_focal_tiles(const at::Tensor& x, Targets& T, const acc_t* alpha, acc_t gamma,
                         acc_t scale, scalar_t* g, at::IntArrayRef g_strides, acc_t* loss) {
  const TileGeom G(x, g ? g_strides : x.strides());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, G.count, G.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kTile], m[kTile], s[kTile], a[kTile], gbuf[kTile], xv[kTile], av[kTile], tv[kTile],
        qv[kTile];
    for (int64_t k = begin; k < end; ++k) {
      const Tile t = G.at(k);
      const int64_t S = t.S;
      const scalar_t* xt = xp + t.xoff;
      tile_targets(G, t, T, xt, alpha, tv, xv, av);  // alpha_t 0 for ignored: no loss, no grad
      tile_stats(G, S, xt, tv, alpha, m, s, (acc_t*)nullptr, buf);
      for (int64_t i = 0; i < S; ++i) {
        if (tv[i] < 0) xv[i] = m[i];  // ignored: any finite terms will do (alpha_t = 0)
      }
      tile_terms(S, xv, av, gamma, scale, m, s, loss + t.r0, a);  // m := lse, s := q
      if (!g) continue;
      scalar_t* gt = g + t.goff;
      tile_grad(G, S, xt, m, a, (const acc_t*)nullptr, (const acc_t*)nullptr, tv, qv, gt, buf,
                gbuf);
      for (int64_t i = 0; i < S; ++i) {  // the target column of each valid lane
        const int64_t y = static_cast<int64_t>(tv[i]);
        if (y >= 0) gt[i * G.glane + y * G.gC] = static_cast<scalar_t>(-a[i] * s[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_focal_fwd(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& alpha,
                                                     const c10::optional<at::Tensor>& grad_scale,
                                                     int64_t ignore_index, double gamma,
                                                     bool compute_grad) {
  TORCH_CHECK(logits.dim() == 3, "fusedloss::softmax_focal: logits must be viewed as [N, C, D]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous() &&
                  target.numel() == logits.size(0) * logits.size(2),
              "fusedloss::softmax_focal: target must be a contiguous int64 vector of N*D rows");
  TORCH_CHECK(!alpha.has_value() ||
                  (alpha->scalar_type() == acc_dtype(logits) && alpha->is_contiguous() &&
                   alpha->numel() == logits.size(1)),
              "fusedloss::softmax_focal: alpha must be a contiguous vector of C classes in the "
              "accumulation dtype (fp32, fp64 for fp64 logits)");
  TORCH_CHECK(!grad_scale.has_value() || grad_scale->numel() == 1,
              "fusedloss::softmax_focal: grad_scale must be a scalar");
  TORCH_CHECK(gamma >= 0, "fusedloss::softmax_focal: gamma must be >= 0");
  const int64_t rows = logits.size(0) * logits.size(2);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_dtype(logits)));
  at::Tensor grad = compute_grad ? empty_reused(logits.sizes(), logits.options())
                                 : at::empty({0}, logits.options());
  Targets T(target, logits.size(1), ignore_index);
  const auto dtype = logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedloss_smfl", [&] {
    using acc_t = acc_type<scalar_t>;
    const bool tiles = TileGeom::suits(logits, compute_grad ? grad.strides() : logits.strides());
    (tiles ? softmax_focal_tiles<scalar_t> : softmax_focal_rows<scalar_t>)(
        logits, T, alpha.has_value() ? alpha->const_data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(gamma), static_cast<acc_t>(scalar_or(grad_scale, 1.0)),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
        compute_grad ? grad.strides() : at::IntArrayRef(), loss.data_ptr<acc_t>());
  });
  T.raise_if_bad("fusedloss.softmax_focal_loss");
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("sigmoid_focal_fwd", &sigmoid_focal_fwd);
  m.impl("softmax_focal_fwd", &softmax_focal_fwd);
}

}  // namespace fusedloss
