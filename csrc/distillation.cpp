// Knowledge distillation from logits, one row (a token's V classes) at a time. With temperature
// T, a = s / T (student), b = t / T (teacher), q = softmax(a), p = softmax(b), hard weight h and
// the optional class target y:
//   beta = 0:      D = KL(p || q) = sum_j p_j (b_j - a_j) - lse_b + lse_a
//   beta = 1:      D = KL(q || p) = sum_j q_j (a_j - b_j) - lse_a + lse_b
//   0 < beta < 1:  D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
//   row loss       L = T^2 D + h (lse(s) - s_y)          (0 for an ignored row)
// Gradient (student only; dL/ds = T dD/da + h (softmax(s) - [j == y])):
//   beta = 0: dD/da_j = q_j - p_j
//   beta = 1: dD/da_j = q_j (log q_j - log p_j - K),           K = KL(q || p)
//   JSD:      dD/da_j = (1 - beta) q_j (log q_j - log m_j - K), K = KL(q || m)
// Forward: one read of both rows for the KL cases: online lse of a and of b, and the sum over j of
// exp(b_j - m_b)(b_j - a_j) (reverse: exp(a_j - m_a)(a_j - b_j)), rescaled as the maxima grow;
// terms of zero probability are 0 (a teacher logit of -inf puts exactly no mass there). The JSD
// needs both normalisers before log m_j exists: a second read. The hard term's lse and 1 - p_y
// come from the same read (rows.h's row_finish: no cancellation on confident rows).
// Backward recomputes from per-row statistics (lse_a, lse_b, K, lse(s), 1 - p_y): one read of both
// rows and one write of the gradient, with grad_output folded in, as cross-entropy. Writing the
// gradient in forward instead costs the same reads plus a second write and read of a
// logits-sized buffer to apply grad_output, and holds that buffer from forward to backward.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "elementwise.h"
#include "rows.h"

namespace fusedloss {
namespace {

enum KdMode : int { kForwardKL = 0, kReverseKL = 1, kJsd = 2 };
constexpr int64_t kStats = 5;  // per row: lse_a, lse_b, K, lse(s), 1 - p_y

template <typename T>
struct KdConst {
  T inv_t, t, beta, log_b, log_1mb, c, hw;  // c: 1 (reverse) or 1 - beta (JSD)
  int mode;
};

// log m_j = log(beta p_j + (1 - beta) q_j) from lp = log p_j and lq = log q_j.
template <typename T>
FL_ALWAYS_INLINE T log_mix(T lp, T lq, const KdConst<T>& k) {
  const T u = k.log_b + lp, v = k.log_1mb + lq;
  return std::max(u, v) + fast_log1p(fast_exp(-std::abs(u - v)));
}

// dD/da_j from a_j, b_j and the row's lse_a, lse_b, K (the mode a template argument, so that
// the loops below vectorise without a branch inside).
template <int kMode, typename T>
FL_ALWAYS_INLINE T kd_dda(T a, T b, T lse_a, T lse_b, T K, const KdConst<T>& k) {
  const T lq = a - lse_a;
  const T q = fast_exp(lq);
  const T lp = b - lse_b;
  if constexpr (kMode == kForwardKL) return q - fast_exp(lp);
  T lm = lp;
  if constexpr (kMode == kJsd) lm = log_mix(lp, lq, k);
  return q > 0 ? k.c * q * (lq - lm - K) : T(0);
}
template <typename T>
FL_ALWAYS_INLINE T kd_dda_any(T a, T b, T lse_a, T lse_b, T K, const KdConst<T>& k) {
  switch (k.mode) {
    case kForwardKL: return kd_dda<kForwardKL>(a, b, lse_a, lse_b, K, k);
    case kReverseKL: return kd_dda<kReverseKL>(a, b, lse_a, lse_b, K, k);
    default: return kd_dda<kJsd>(a, b, lse_a, lse_b, K, k);
  }
}

// Forward read of one block of raw logits s, t (acc type): adds exp(a - sh_a), exp(b - sh_b) and
// the weighted difference to out[0..2].
template <typename T>
FL_ALWAYS_INLINE void kd_sums_impl(const T* s, const T* t, int64_t n, T inv_t, T sh_a, T sh_b,
                                   bool reverse, T* out) {
  T sa = 0, sb = 0, d = 0;
  if (reverse) {
#pragma omp simd reduction(+ : sa, sb, d)
    for (int64_t i = 0; i < n; ++i) {
      const T a = s[i] * inv_t, b = t[i] * inv_t;
      const T ea = fast_exp(a - sh_a);
      sa += ea;
      sb += fast_exp(b - sh_b);
      d += ea > 0 ? ea * (a - b) : T(0);
    }
  } else {
#pragma omp simd reduction(+ : sa, sb, d)
    for (int64_t i = 0; i < n; ++i) {
      const T a = s[i] * inv_t, b = t[i] * inv_t;
      const T eb = fast_exp(b - sh_b);
      sa += fast_exp(a - sh_a);
      sb += eb;
      d += eb > 0 ? eb * (b - a) : T(0);
    }
  }
  out[0] += sa;
  out[1] += sb;
  out[2] += d;
}

// JSD's second read: adds beta KL(p || m) + (1 - beta) KL(q || m) and KL(q || m) of a block.
template <typename T>
FL_ALWAYS_INLINE void kd_jsd_impl(const T* s, const T* t, int64_t n, T lse_a, T lse_b,
                                  const KdConst<T>& k, T* out) {
  T jsd = 0, kqm = 0;
#pragma omp simd reduction(+ : jsd, kqm)
  for (int64_t i = 0; i < n; ++i) {
    const T lq = s[i] * k.inv_t - lse_a, lp = t[i] * k.inv_t - lse_b;
    const T q = fast_exp(lq), p = fast_exp(lp);
    const T lm = log_mix(lp, lq, k);
    const T tq = q > 0 ? q * (lq - lm) : T(0);
    const T tp = p > 0 ? p * (lp - lm) : T(0);
    jsd += k.beta * tp + (T(1) - k.beta) * tq;
    kqm += tq;
  }
  out[0] += jsd;
  out[1] += kqm;
}

// Backward: g_j = scale (T dD/da_j + h exp(s_j - lse_s)) (the target column is fixed afterwards).
template <int kMode, bool kHard, typename T>
FL_ALWAYS_INLINE void kd_grad_loop(const T* s, const T* t, int64_t n, const T* st,
                                   const KdConst<T>& k, T scale, T* g) {
  const T lse_a = st[0], lse_b = st[1], K = st[2], lse_s = st[3];
  const T kt = k.t * scale, kh = k.hw * scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T v = kt * kd_dda<kMode>(s[i] * k.inv_t, t[i] * k.inv_t, lse_a, lse_b, K, k);
    if constexpr (kHard) v += kh * fast_exp(s[i] - lse_s);
    g[i] = v;
  }
}
template <int kMode, typename T>
FL_ALWAYS_INLINE void kd_grad_hard(const T* s, const T* t, int64_t n, const T* st,
                                   const KdConst<T>& k, T scale, T* g) {
  if (k.hw != 0) return kd_grad_loop<kMode, true>(s, t, n, st, k, scale, g);
  kd_grad_loop<kMode, false>(s, t, n, st, k, scale, g);
}
template <typename T>
FL_ALWAYS_INLINE void kd_grad_impl(const T* s, const T* t, int64_t n, const T* st,
                                   const KdConst<T>& k, T scale, T* g) {
  switch (k.mode) {
    case kForwardKL: return kd_grad_hard<kForwardKL>(s, t, n, st, k, scale, g);
    case kReverseKL: return kd_grad_hard<kReverseKL>(s, t, n, st, k, scale, g);
    default: return kd_grad_hard<kJsd>(s, t, n, st, k, scale, g);
  }
}

FL_MULTIVERSION void kd_sums(const float* s, const float* t, int64_t n, float inv_t, float sh_a,
                             float sh_b, bool reverse, float* out) {
  kd_sums_impl(s, t, n, inv_t, sh_a, sh_b, reverse, out);
}
void kd_sums(const double* s, const double* t, int64_t n, double inv_t, double sh_a, double sh_b,
             bool reverse, double* out) {
  kd_sums_impl(s, t, n, inv_t, sh_a, sh_b, reverse, out);
}
FL_MULTIVERSION void kd_jsd(const float* s, const float* t, int64_t n, float lse_a, float lse_b,
                            const KdConst<float>& k, float* out) {
  kd_jsd_impl(s, t, n, lse_a, lse_b, k, out);
}
void kd_jsd(const double* s, const double* t, int64_t n, double lse_a, double lse_b,
            const KdConst<double>& k, double* out) {
  kd_jsd_impl(s, t, n, lse_a, lse_b, k, out);
}
FL_MULTIVERSION void kd_grad(const float* s, const float* t, int64_t n, const float* st,
                             const KdConst<float>& k, float scale, float* g) {
  kd_grad_impl(s, t, n, st, k, scale, g);
}
void kd_grad(const double* s, const double* t, int64_t n, const double* st,
             const KdConst<double>& k, double scale, double* g) {
  kd_grad_impl(s, t, n, st, k, scale, g);
}

template <typename T>
KdConst<T> kd_const(double temperature, double beta, double hard_weight) {
  KdConst<T> k;
  k.t = static_cast<T>(temperature);
  k.inv_t = static_cast<T>(1.0 / temperature);
  k.beta = static_cast<T>(beta);
  k.mode = beta == 0 ? kForwardKL : (beta == 1 ? kReverseKL : kJsd);
  k.log_b = k.mode == kJsd ? static_cast<T>(std::log(beta)) : T(0);
  k.log_1mb = k.mode == kJsd ? static_cast<T>(std::log1p(-beta)) : T(0);
  k.c = k.mode == kJsd ? static_cast<T>(1 - beta) : T(1);
  k.hw = static_cast<T>(hard_weight);
  return k;
}

void check_args(const char* fn, const at::Tensor& s, const at::Tensor& t,
                const c10::optional<at::Tensor>& target, double temperature, double beta,
                double hard_weight) {
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes() && t.scalar_type() == s.scalar_type(), fn,
              ": student and teacher logits must be [rows, V] of one shape and dtype");
  TORCH_CHECK(!target.has_value() ||
                  (target->scalar_type() == at::kLong && target->dim() == 1 &&
                   target->is_contiguous() && target->numel() == s.size(0)),
              fn, ": target must be a contiguous int64 vector, one per row");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), fn, ": temperature must be > 0");
  TORCH_CHECK(beta >= 0 && beta <= 1, fn, ": beta must be in [0, 1]");
  TORCH_CHECK(hard_weight >= 0 && std::isfinite(hard_weight), fn, ": hard_weight must be >= 0");
  TORCH_CHECK(hard_weight == 0 || target.has_value(), fn, ": hard_weight > 0 needs a target");
}

// A row's class, or -1 for an ignored (or, reported later, out-of-range) row; 0 without target.
struct RowTarget {
  c10::optional<Targets> T;
  RowTarget(const c10::optional<at::Tensor>& target, int64_t C, int64_t ignore_index) {
    if (target.has_value()) T.emplace(*target, C, ignore_index);
  }
  int64_t operator()(int64_t r) { return T ? (*T)(r) : 0; }
  void raise_if_bad() const {
    if (T) T->raise_if_bad("fusedloss.distillation_loss");
  }
};

std::tuple<at::Tensor, at::Tensor> distill_fwd(const at::Tensor& student,
                                               const at::Tensor& teacher,
                                               const c10::optional<at::Tensor>& target,
                                               double temperature, double beta,
                                               int64_t ignore_index, double hard_weight) {
  check_args("fusedloss::distill_fwd", student, teacher, target, temperature, beta, hard_weight);
  const int64_t rows = student.size(0);
  auto opts = student.options().dtype(acc_dtype(student));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor stats = at::empty({rows, kStats}, opts);
  const at::Tensor s3 = student.unsqueeze(-1), t3 = teacher.unsqueeze(-1);
  RowTarget Y(target, student.size(1), ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const RowGeom<scalar_t> S(s3), Tg(t3);
    const KdConst<acc_t> k = kd_const<acc_t>(temperature, beta, hard_weight);
    const bool hard = hard_weight != 0;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* stp = stats.data_ptr<acc_t>();
    const int64_t C = S.C;
    at::parallel_for(0, rows, S.grain(), [&](int64_t begin, int64_t end) {
      acc_t sbuf[kBlock], tbuf[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        acc_t* st = stp + r * kStats;
        const int64_t y = Y(r);
        if (y < 0) {
          lp[r] = 0;
          std::fill_n(st, kStats, acc_t(0));
          continue;
        }
        const scalar_t* sr = S.row(r);
        const scalar_t* tr = Tg.row(r);
        const acc_t x_y = static_cast<acc_t>(sr[y * S.sC]);
        OnlineLSE<acc_t> ce;  // the hard term: over j != y, seeded with x_y (rows.h)
        ce.m = x_y;
        acc_t ma = kNegInf, mb = kNegInf, sums[3] = {0, 0, 0};
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const int64_t nb = std::min(kBlock, C - c0);
          load_block(sr + c0 * S.sC, S.sC, nb, sbuf);
          load_block(tr + c0 * Tg.sC, Tg.sC, nb, tbuf);
          const acc_t ma_new = std::max(ma, block_max(sbuf, nb) * k.inv_t);
          const acc_t mb_new = std::max(mb, block_max(tbuf, nb) * k.inv_t);
          // a shift of 0 while a row is all -inf so far keeps exp's argument free of -inf - -inf
          const acc_t sh_a = ma_new == kNegInf ? acc_t(0) : ma_new;
          const acc_t sh_b = mb_new == kNegInf ? acc_t(0) : mb_new;
          const acc_t fa = fast_exp(ma - sh_a), fb = fast_exp(mb - sh_b);  // <= 1
          sums[0] *= fa;
          sums[1] *= fb;
          sums[2] *= k.mode == kReverseKL ? fa : fb;
          kd_sums(sbuf, tbuf, nb, k.inv_t, sh_a, sh_b, k.mode == kReverseKL, sums);
          ma = sh_a;
          mb = sh_b;
          if (hard) {
            if (y >= c0 && y < c0 + nb) sbuf[y - c0] = kNegInf;
            ce.add(sbuf, nb);
          }
        }
        const acc_t lse_a = ma + std::log(sums[0]), lse_b = mb + std::log(sums[1]);
        acc_t div, K = 0;
        if (k.mode == kForwardKL) {
          div = sums[2] / sums[1] - lse_b + lse_a;
        } else if (k.mode == kReverseKL) {
          div = sums[2] / sums[0] - lse_a + lse_b;
          K = div;
        } else {
          acc_t js[2] = {0, 0};
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
            const int64_t nb = std::min(kBlock, C - c0);
            load_block(sr + c0 * S.sC, S.sC, nb, sbuf);
            load_block(tr + c0 * Tg.sC, Tg.sC, nb, tbuf);
            kd_jsd(sbuf, tbuf, nb, lse_a, lse_b, k, js);
          }
          div = js[0];
          K = js[1];
        }
        acc_t l = k.t * k.t * div;
        st[0] = lse_a;
        st[1] = lse_b;
        st[2] = K;
        st[3] = 0;
        st[4] = 0;
        if (hard) {
          const RowStats<acc_t> h = row_finish(ce.m, ce.s, x_y);
          l += k.hw * h.nll;
          st[3] = h.lse;
          st[4] = h.q;
        }
        lp[r] = l;
      }
    });
  });
  Y.raise_if_bad();
  return {loss, stats};
}

void distill_backward(const at::Tensor& grad_scale, const at::Tensor& student,
                      const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                      const at::Tensor& stats, double temperature, double beta,
                      int64_t ignore_index, double hard_weight, at::Tensor& grad) {
  check_args("fusedloss::distill_bwd", student, teacher, target, temperature, beta, hard_weight);
  const int64_t rows = student.size(0);
  TORCH_CHECK(stats.scalar_type() == acc_dtype(student) && stats.is_contiguous() &&
                  stats.numel() == rows * kStats,
              "fusedloss::distill_bwd: stats must be the forward's per-row statistics");
  TORCH_CHECK(grad_scale.scalar_type() == acc_dtype(student) && grad_scale.is_contiguous() &&
                  (grad_scale.numel() == 1 || grad_scale.numel() == rows),
              "fusedloss::distill_bwd: grad_scale must be a scalar or one per row, in the "
              "accumulation dtype");
  const at::Tensor s3 = student.unsqueeze(-1), t3 = teacher.unsqueeze(-1);
  RowTarget Y(target, student.size(1), ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const RowGeom<scalar_t> S(s3), Tg(t3);
    const KdConst<acc_t> k = kd_const<acc_t>(temperature, beta, hard_weight);
    const acc_t* stp = stats.const_data_ptr<acc_t>();
    const acc_t* scp = grad_scale.const_data_ptr<acc_t>();
    const bool per_row = grad_scale.numel() != 1;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t gN = grad.stride(0), gC = grad.stride(1), C = S.C;
    at::parallel_for(0, rows, S.grain(), [&](int64_t begin, int64_t end) {
      acc_t sbuf[kBlock], tbuf[kBlock], gbuf[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gr = g + r * gN;
        const int64_t y = Y(r);
        if (y < 0) {
          for (int64_t c = 0; c < C; ++c) gr[c * gC] = scalar_t(0);
          continue;
        }
        const scalar_t* sr = S.row(r);
        const scalar_t* tr = Tg.row(r);
        const acc_t* st = stp + r * kStats;
        const acc_t scale = scp[per_row ? r : 0];
        // read before the sweep: gr may be the student's row itself
        const acc_t s_y = static_cast<acc_t>(sr[y * S.sC]);
        const acc_t t_y = static_cast<acc_t>(tr[y * Tg.sC]);
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const int64_t nb = std::min(kBlock, C - c0);
          load_block(sr + c0 * S.sC, S.sC, nb, sbuf);
          load_block(tr + c0 * Tg.sC, Tg.sC, nb, tbuf);
          kd_grad(sbuf, tbuf, nb, st, k, scale, gbuf);
          store_block(gbuf, nb, gr + c0 * gC, gC);
        }
        if (k.hw != 0) {
          // h (p_y - 1) = -h (1 - p_y), with 1 - p_y from forward (no cancellation)
          const acc_t d = kd_dda_any(s_y * k.inv_t, t_y * k.inv_t, st[0], st[1], st[2], k);
          gr[y * gC] = static_cast<scalar_t>(scale * (k.t * d - k.hw * st[4]));
        }
      }
    });
  });
}

at::Tensor distill_bwd(const at::Tensor& grad_scale, const at::Tensor& student,
                       const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                       const at::Tensor& stats, double temperature, double beta,
                       int64_t ignore_index, double hard_weight) {
  at::Tensor grad = empty_reused(student.sizes(), student.options());
  distill_backward(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                   hard_weight, grad);
  return grad;
}

void distill_bwd_inplace(const at::Tensor& grad_scale, at::Tensor& student,
                         const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                         const at::Tensor& stats, double temperature, double beta,
                         int64_t ignore_index, double hard_weight) {
  distill_backward(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                   hard_weight, student);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("distill_fwd", &distill_fwd);
  m.impl("distill_bwd", &distill_bwd);
  m.impl("distill_bwd_inplace", &distill_bwd_inplace);
}

}  // namespace fusedloss
