// The driver shared by the element-wise losses (BCE-with-logits, Huber / SmoothL1).
//
// Every operand is a strided view of one [D0, D1, D2, D3] index space: the Python layer
// broadcasts with expand (stride 0, no copy) and merges dims that every operand can merge
// (fusedloss/_elementwise.py), so broadcast weights and non-contiguous inputs are read in place.
// Outputs (per-element loss, gradients) are contiguous over that space; fp32 runs are read and
// written in place, other dtypes go through L1-sized fp32 buffers. Forward writes the loss
// only; backward re-reads the inputs and writes the gradients with grad_out folded in (the same
// memory traffic as saving a gradient in forward, no buffer held between the two, and any number
// of backward calls).
//
// The index space is cut into fixed chunks of kElemChunk elements, one fp32 partial sum each,
// added pairwise in chunk order: the reduced loss does not depend on the thread count.
#pragma once

#include <ATen/ops/empty.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace fusedloss {

constexpr int64_t kElemChunk = 4 * kBlock;

// The per-block math is forced inline into each FL_MULTIVERSION clone so that it is compiled for
// that clone's ISA; left as a call it stays baseline x86-64, where std::nearbyint (fast_exp) is a
// libcall and the loop does not vectorise. (setup.py also sets -fno-trapping-math, for the selects.)
#if defined(__GNUC__)
#define FL_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FL_ALWAYS_INLINE inline
#endif

// Reduction codes, as torch's at::Reduction.
enum ElemReduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

template <typename T>
struct View4 {
  const T* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  View4() = default;
  explicit View4(const c10::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    data = t->const_data_ptr<T>();
    for (int d = 0; d < 4; ++d) stride[d] = t->stride(d);
  }
  const T* at(const int64_t* idx) const {
    return data + idx[0] * stride[0] + idx[1] * stride[1] + idx[2] * stride[2] + idx[3] * stride[3];
  }
};

// One run of an operand as accumulation-type values: the operand's own memory when it already is
// contiguous acc_t, else converted into buf (a broadcast run, stride 0, is one read, not a gather).
template <typename T, typename acc_t>
inline const acc_t* read_run(const View4<T>& v, const int64_t* idx, int64_t n, acc_t* buf) {
  const T* p = v.at(idx);
  if constexpr (std::is_same_v<T, acc_t>) {
    if (v.stride[3] == 1) return p;
  }
  if (v.stride[3] == 0) {
    std::fill_n(buf, n, static_cast<acc_t>(*p));
  } else {
    load_block(p, v.stride[3], n, buf);
  }
  return buf;
}

// Where a run's output is computed: straight into the (contiguous) output when it is acc_t,
// else into buf, stored (converted) afterwards by write_run.
template <typename T, typename acc_t>
inline acc_t* out_run(T* out, int64_t flat, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (out) return out + flat;
  }
  return buf;
}
template <typename T, typename acc_t>
inline void write_run(const acc_t* src, int64_t n, T* out, int64_t flat) {
  if (out && static_cast<const void*>(src) != static_cast<const void*>(out + flat)) {
    store_block(src, n, out + flat, 1);
  }
}

// fn(flat, n, idx) over [begin, end) in runs of at most kBlock elements along the last dim;
// idx holds the coordinates of the run's first element.
template <typename F>
inline void for_each_run(at::IntArrayRef size, int64_t begin, int64_t end, F&& fn) {
  int64_t idx[4];
  int64_t rest = begin;
  for (int d = 3; d >= 0; --d) {
    idx[d] = rest % size[d];
    rest /= size[d];
  }
  for (int64_t flat = begin; flat < end;) {
    const int64_t n = std::min({kBlock, size[3] - idx[3], end - flat});
    fn(flat, n, idx);
    flat += n;
    idx[3] += n;
    for (int d = 3; d > 0 && idx[d] == size[d]; --d) {
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

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

// What one call of a loss's block math computes: the loss (summed, or stored per element), or
// the gradients times scale * grad_out (w.r.t. input only, or input and target).
enum BlockMode : int { kLossSum = 0, kLossStore = 1, kGradX = 2, kGradXY = 3 };

// Runs an element-wise loss. `block(mode, n, x, y, w, pw, go, scale, loss, gx, gy)` is the loss's
// vectorised math on accumulation-type runs (w, pw are ones where the operand is absent): per
// BlockMode it returns the sum of the per-element loss or writes loss[i], or writes
// gx[i] = dL/dx * scale * go[i] (and gy[i] = dL/dy * scale * go[i]), the product taken in fp32.
// Forward (want_loss): returns the loss, per element in the input dtype or the reduced 0-dim value
// in the acc dtype. Backward (grad_out given, a 4-d view in the input dtype): returns the
// gradients asked for, times grad_out and 1/numel for mean. Unrequested outputs are empty.
template <typename Block>
std::tuple<at::Tensor, at::Tensor, at::Tensor> elementwise_run(
    const char* name, const at::Tensor& x, const at::Tensor& y,
    const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& pw,
    const c10::optional<at::Tensor>& go, int64_t reduction, bool want_loss, bool want_gx,
    bool want_gy, const Block& block) {
  TORCH_CHECK(x.dim() == 4 && y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(),
              name, ": input and target must be 4-d views of one shape and dtype");
  for (const auto* t : {&w, &pw}) {
    TORCH_CHECK(!t->has_value() || ((*t)->sizes() == x.sizes() &&
                                    (*t)->scalar_type() == acc_dtype(x)),
                name, ": weights must be 4-d views of the input's shape in the accumulation dtype");
  }
  TORCH_CHECK(!go.has_value() || (go->sizes() == x.sizes() && go->scalar_type() == x.scalar_type()),
              name, ": grad_out must be a 4-d view of the input's shape and dtype");
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, name,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum)");
  const int64_t numel = x.numel();
  const bool reduce = reduction != kReduceNone;
  const bool grads = want_gx || want_gy;
  at::Tensor loss = !want_loss ? at::empty({0}, x.options())
                    : reduce   ? at::empty({}, x.options().dtype(acc_dtype(x)))
                               : at::empty(x.sizes(), x.options());
  at::Tensor gx = at::empty(want_gx ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor gy = at::empty(want_gy ? x.sizes() : at::IntArrayRef{0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedloss_elementwise", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale = reduction == kReduceMean ? acc_t(1) / static_cast<acc_t>(numel) : acc_t(1);
    const View4<scalar_t> xv(x), yv(y), gov(go);
    const View4<acc_t> wv(w), pwv(pw);
    scalar_t* lp = want_loss && !reduce ? loss.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = want_gx ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = want_gy ? gy.data_ptr<scalar_t>() : nullptr;
    const at::IntArrayRef size = x.sizes();
    const int64_t chunks = (numel + kElemChunk - 1) / kElemChunk;
    std::vector<acc_t> partial(want_loss && reduce ? chunks : 0);
    const int mode = want_loss ? (reduce ? kLossSum : kLossStore) : (want_gy ? kGradXY : kGradX);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      acc_t xb[kBlock], yb[kBlock], wb[kBlock], pb[kBlock], lb[kBlock], gxb[kBlock], gyb[kBlock],
          gob[kBlock];
      if (!wv.data) std::fill_n(wb, kBlock, acc_t(1));
      if (!pwv.data) std::fill_n(pb, kBlock, acc_t(1));
      for (int64_t c = c0; c < c1; ++c) {
        acc_t part = 0;
        for_each_run(size, c * kElemChunk, std::min(numel, (c + 1) * kElemChunk),
                     [&](int64_t flat, int64_t n, const int64_t* idx) {
          const acc_t* xr = read_run(xv, idx, n, xb);
          const acc_t* yr = read_run(yv, idx, n, yb);
          const acc_t* wr = wv.data ? read_run(wv, idx, n, wb) : wb;
          const acc_t* pr = pwv.data ? read_run(pwv, idx, n, pb) : pb;
          const acc_t* gor = grads ? read_run(gov, idx, n, gob) : gob;
          acc_t* l = out_run(lp, flat, lb);
          acc_t* gxr = out_run(gxp, flat, gxb);
          acc_t* gyr = out_run(gyp, flat, gyb);
          part += block(mode, n, xr, yr, wr, pr, gor, scale, l, gxr, gyr);
          if (mode == kLossStore) write_run(l, n, lp, flat);
          if (grads) {
            write_run(gxr, n, gxp, flat);
            write_run(gyr, n, gyp, flat);
          }
        });
        if (want_loss && reduce) partial[c] = part;
      }
    });
    if (want_loss && reduce) {
      const acc_t total = pairwise_sum(partial.data(), chunks);
      // mean of nothing is NaN, as torch's
      *loss.data_ptr<acc_t>() = reduction == kReduceMean ? total / static_cast<acc_t>(numel) : total;
    }
  });
  return {loss, gx, gy};
}

}  // namespace fusedloss
