// Softmax cross-entropy over class-index targets, one row at a time.
//   forward:  one read of the row (online lse, x[y], and sum_c w_c x_c for label smoothing)
//   backward: one read of the row and one write of its gradient, from the saved lse, with
//             grad_output (and 1/sum of weights for mean) folded in.
// Measured faster than writing the gradient in forward and scaling it in backward: that costs a
// second write and read of a logits-sized buffer (see bench/bench_cross_entropy.py).
// Row loss, with eps = label_smoothing, w_y = weight[y] (1 without weight), W = sum_c w_c:
//   L = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
// Gradient, with p = softmax(x), A = (1-eps) w_y + eps/C W + 2 z lse:
//   dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y]
// Confident rows (rows.h): lse - x_y is computed as log1p(S / e_y) in forward, and the target
// column as -A q + eps/C (W - w_y) + 2 z lse with q = 1 - p_y = sum_{j != y} p_j summed in the
// backward sweep, never as p_y - 1.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "rows.h"

namespace fusedloss {
namespace {

// What both passes share: the row geometry (rows.h), the weights and the option constants.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct Rows : RowGeom<scalar_t> {
  const acc_t* w;  // nullptr: no class weights
  acc_t w_sum, eps, k, z;

  Rows(const at::Tensor& logits, const c10::optional<at::Tensor>& weight, double label_smoothing,
       double z_loss)
      : RowGeom<scalar_t>(logits),
        w(weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr),
        w_sum(weight.has_value() ? weight->sum().item<acc_t>() : static_cast<acc_t>(this->C)),
        eps(static_cast<acc_t>(label_smoothing)), k(eps / static_cast<acc_t>(this->C)),
        z(static_cast<acc_t>(z_loss)) {}
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_forward_rows(const Rows<scalar_t>& R, Targets& T, acc_t* loss, acc_t* lse_out) {
  at::parallel_for(0, R.rows(), R.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = T(r);
      if (y < 0) {
        loss[r] = 0;
        lse_out[r] = 0;
        continue;
      }
      acc_t swx = 0;
      const RowStats<acc_t> st = row_stats(R.row(r), R.sC, R.C, y, R.w, R.eps != 0 ? &swx : nullptr,
                                           buf);
      const acc_t wy = R.w ? R.w[y] : acc_t(1);
      // Terms with a zero coefficient are skipped, not multiplied by 0: lse may be huge (inf * 0).
      acc_t l = (1 - R.eps) * wy * st.nll;
      if (R.eps != 0) l += R.k * (R.w_sum * st.lse - swx);
      if (R.z != 0) l += R.z * st.lse * st.lse;
      loss[r] = l;
      lse_out[r] = st.lse;
    }
  });
}

// Writes the gradient through g (any strides; g may be the logits themselves: each element is
// read before it is overwritten, and x_y is not needed after forward).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_backward_rows(const at::Tensor& /*x: R's*/, const Rows<scalar_t>& R, Targets& T,
                      const acc_t* lse_in, const acc_t* scale, bool per_row_scale, scalar_t* g,
                      at::IntArrayRef g_strides) {
  const int64_t gN = g_strides[0], gC = g_strides[1], gD = g_strides[2];
  at::parallel_for(0, R.rows(), R.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    acc_t gbuf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gr = g + (r / R.D) * gN + (r % R.D) * gD;
      const int64_t y = T(r);
      if (y < 0) {
        for (int64_t c = 0; c < R.C; ++c) gr[c * gC] = scalar_t(0);
        continue;
      }
      const acc_t lse = lse_in[r];
      const acc_t s = scale[per_row_scale ? r : 0];
      const acc_t wy = R.w ? R.w[y] : acc_t(1);
      const acc_t a = (1 - R.eps) * wy + R.k * R.w_sum + 2 * R.z * lse;
      const acc_t q = row_grad(R.row(r), R.sC, R.C, y, lse, a, R.k, R.w, s, gr, gC, buf, gbuf);
      // p_y a - k w_y - (1-eps) w_y = -a (1 - p_y) + k (W - w_y) + 2 z lse, with 1 - p_y = q.
      const acc_t gy = -a * q + R.k * (R.w_sum - wy) + 2 * R.z * lse;
      gr[y * gC] = static_cast<scalar_t>(s * gy);
    }
  });
}

// ---- tiles (rows.h): (N, C, H, W) pixels, or (N, C) rows with few classes, one lane per row ----

#define CE_INLINE __attribute__((always_inline)) inline

// The row loss of each lane (see the header) from m (the max), s (the sum of exp(x - m) without
// the target), xt (x at the target), wy (weight[y]) and swx; ignored lanes (tv < 0) get loss and
// lse 0. Selects, not branches, so that it vectorises (a zero-coefficient term is discarded, never
// multiplied by 0: lse may be huge).
template <typename T>
CE_INLINE void ce_tile_terms_impl(int64_t n, const T* m, const T* s, const T* xt, const T* wy,
                                  const T* swx, const T* tv, T eps, T k, T W, T z, T* loss,
                                  T* lse) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const RowStats<T> st = row_finish(m[i], s[i], xt[i]);
    T l = (1 - eps) * wy[i] * st.nll;
    l += eps != 0 ? k * (W * st.lse - swx[i]) : T(0);
    l += z != 0 ? z * st.lse * st.lse : T(0);
    loss[i] = tv[i] < 0 ? T(0) : l;
    lse[i] = tv[i] < 0 ? T(0) : st.lse;
  }
}
FL_MULTIVERSION void ce_tile_terms(int64_t n, const float* m, const float* s, const float* xt,
                                   const float* wy, const float* swx, const float* tv, float eps,
                                   float k, float W, float z, float* loss, float* lse) {
  ce_tile_terms_impl(n, m, s, xt, wy, swx, tv, eps, k, W, z, loss, lse);
}
void ce_tile_terms(int64_t n, const double* m, const double* s, const double* xt,
                   const double* wy, const double* swx, const double* tv, double eps, double k,
                   double W, double z, double* loss, double* lse) {
  ce_tile_terms_impl(n, m, s, xt, wy, swx, tv, eps, k, W, z, loss, lse);
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_forward_tiles(const at::Tensor& x, const Rows<scalar_t>& R, Targets& T, acc_t* loss,
                      acc_t* lse) {
  const TileGeom G(x, x.strides());
  at::parallel_for(0, G.count, G.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kTile], m[kTile], s[kTile], xv[kTile], wv[kTile], tv[kTile], dv[kTile];
    for (int64_t k = begin; k < end; ++k) {
      const Tile t = G.at(k);
      const int64_t S = t.S;
      const scalar_t* xt = R.x + t.xoff;
      tile_targets(G, t, T, xt, R.w, tv, xv, wv);
      tile_stats(G, S, xt, tv, R.w, m, s, R.eps != 0 ? dv : nullptr, buf);
      ce_tile_terms(S, m, s, xv, wv, dv, tv, R.eps, R.k, R.w_sum, R.z, loss + t.r0, lse + t.r0);
    }
  });
}

// The gradient of a tile: a = scale (A) and b = scale k per lane, g_j = a p_j - b w_j (tile_grad,
// which writes ignored lanes as exact zeros), then the target column from q (rows.h).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_backward_tiles(const at::Tensor& x, const Rows<scalar_t>& R, Targets& T,
                       const acc_t* lse_in, const acc_t* scale, bool per_row_scale, scalar_t* g,
                       at::IntArrayRef g_strides) {
  const TileGeom G(x, g_strides);
  at::parallel_for(0, G.count, G.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kTile], gbuf[kTile], lse[kTile], a[kTile], b[kTile], q[kTile], wv[kTile], tv[kTile];
    for (int64_t k = begin; k < end; ++k) {
      const Tile t = G.at(k);
      const int64_t S = t.S;
      const scalar_t* xt = R.x + t.xoff;
      scalar_t* gt = g + t.goff;
      tile_targets(G, t, T, xt, R.w, tv, (acc_t*)nullptr, wv);
      for (int64_t i = 0; i < S; ++i) {
        const bool valid = tv[i] >= 0;
        const acc_t sc = valid ? scale[per_row_scale ? t.r0 + i : 0] : acc_t(0);
        lse[i] = valid ? lse_in[t.r0 + i] : acc_t(0);
        a[i] = sc * ((1 - R.eps) * wv[i] + R.k * R.w_sum + 2 * R.z * lse[i]);
        b[i] = sc * R.k;
      }
      tile_grad(G, S, xt, lse, a, R.k != 0 ? b : nullptr, R.w, tv, q, gt, buf, gbuf);
      for (int64_t i = 0; i < S; ++i) {
        const int64_t y = static_cast<int64_t>(tv[i]);
        if (y < 0) continue;
        // p_y A - k w_y - (1-eps) w_y = -A q + k (W - w_y) + 2 z lse; a = scale A, b = scale k.
        const acc_t sc = scale[per_row_scale ? t.r0 + i : 0];
        const acc_t gy = -a[i] * q[i] + b[i] * (R.w_sum - wv[i]) + sc * 2 * R.z * lse[i];
        gt[i * G.glane + y * G.gC] = static_cast<scalar_t>(gy);
      }
    }
  });
}

void check_args(const at::Tensor& logits, const at::Tensor& target,
                const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 3, "fusedloss::cross_entropy: logits must be viewed as [N, C, D]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous() &&
                  target.numel() == logits.size(0) * logits.size(2),
              "fusedloss::cross_entropy: target must be a contiguous int64 vector of N*D rows");
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == acc_dtype(logits) && weight->is_contiguous() &&
                    weight->numel() == logits.size(1),
                "fusedloss::cross_entropy: weight must be a contiguous vector of C classes in the "
                "accumulation dtype (fp32, fp64 for fp64 logits)");
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double z_loss) {
  check_args(logits, target, weight);
  const int64_t rows = logits.size(0) * logits.size(2);
  auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  Targets T(target, logits.size(1), ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> R(logits, weight, label_smoothing, z_loss);
    if (TileGeom::suits(logits, logits.strides())) {
      ce_forward_tiles(logits, R, T, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
    } else {
      ce_forward_rows(R, T, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
    }
  });
  T.raise_if_bad("fusedloss.cross_entropy");
  return {loss, lse};
}

void ce_backward(const at::Tensor& grad_scale, const at::Tensor& logits, const at::Tensor& target,
                 const at::Tensor& lse, const c10::optional<at::Tensor>& weight,
                 int64_t ignore_index, double label_smoothing, double z_loss, at::Tensor& grad) {
  check_args(logits, target, weight);
  const int64_t rows = logits.size(0) * logits.size(2);
  TORCH_CHECK(lse.scalar_type() == acc_dtype(logits) && lse.is_contiguous() && lse.numel() == rows,
              "fusedloss::cross_entropy_bwd: lse must be the forward's per-row lse");
  TORCH_CHECK(grad_scale.scalar_type() == acc_dtype(logits) && grad_scale.is_contiguous() &&
                  (grad_scale.numel() == 1 || grad_scale.numel() == rows),
              "fusedloss::cross_entropy_bwd: grad_scale must be a scalar or one per row, in the "
              "accumulation dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> R(logits, weight, label_smoothing, z_loss);
    Targets T(target, logits.size(1), ignore_index);
    (TileGeom::suits(logits, grad.strides()) ? ce_backward_tiles<scalar_t>
                                              : ce_backward_rows<scalar_t>)(
        logits, R, T, lse.const_data_ptr<acc_t>(), grad_scale.const_data_ptr<acc_t>(),
        grad_scale.numel() != 1, grad.data_ptr<scalar_t>(), grad.strides());
  });
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_scale, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& lse,
                             const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                             double label_smoothing, double z_loss) {
  at::Tensor grad = empty_reused(logits.sizes(), logits.options());
  ce_backward(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing, z_loss, grad);
  return grad;
}

void cross_entropy_bwd_inplace(const at::Tensor& grad_scale, at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& lse,
                               const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                               double label_smoothing, double z_loss) {
  ce_backward(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing, z_loss,
              logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace);
}

}  // namespace fusedloss
