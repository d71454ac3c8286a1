// The driver shared by the element-wise losses (BCE-with-logits, Huber / SmoothL1, KL).
//
// Every operand is a strided view of one [D0, D1, D2, D3] index space: the callers broadcast
// with expand (stride 0, no copy), and the Python layer merges dims that every operand can merge
// (fusedloss/_elementwise.py; it must, to bring more than 4 dims down to 4 without a copy), so
// broadcast weights and non-contiguous inputs are read in place. The C++ one-call path
// (autograd.cpp's EwOperands) passes the input's own dims; coalesce_dims below merges them here,
// for every caller (a no-op on the Python layer's views).
// Outputs (per-element loss, gradients) are contiguous over that space. The forward ops write
// the loss only and the backward ops re-read the inputs and write the gradients with grad_out
// folded in (no buffer held between the two, any number of backward calls). Under autograd on the
// CPU a reduced loss takes a third form (*_fwd_grad, kLossSumGradX): the loss and the input's
// gradient in one pass, so that backward, when grad_out is 1, reads nothing (autograd.cpp).
//
// The common case is one loop per element as Inductor writes it: where input and target are
// contiguous along the last dim and in fp32, bf16 or fp64, the loss's loop reads them in place,
// widens bf16 in registers, computes the loss (summed in fp32 lanes) or the gradients, and stores
// the outputs narrowed in the same loop. Without weights and with a scalar grad_out (every
// reduced loss) it is the "lean" loop: two loads per element, no ones-vectors, grad_out * scale
// one register. Other layouts (strided or broadcast runs, fp16) go through L1-sized fp32
// buffers into the fp32 loop. The mixed bf16/fp32 loops run at full AVX-512 width because the
// clone targets x86-64-v4 (AVX512BW: 16-bit lanes in zmm) and the sums avoid omp reductions
// (lane_sum, common.h); before both, gcc compiled them at 256 bits and bf16 BCE and KL were faster
// through the buffers.
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

// Merges adjacent dims of the common 4-d shape through which every operand steps as through one
// (stride[d - 1] == stride[d] * size[d], or either size 1), so that the runs along the last dim
// are as long as the data allows: a (C, 1, 1) pos_weight over NCHW inputs gives runs of H * W
// instead of W (16x64x64x64: runs of 64 paid a call, a buffer fill and a lane total each).
// Merging keeps the row-major order, so flat indices (the outputs') are unchanged.
template <typename... V>
inline void coalesce_dims(int64_t* size, V&... views) {
  for (int d = 3; d > 0;) {
    const int64_t a = size[d - 1], b = size[d];
    const bool merge = a == 1 || b == 1 ||
                       ((!views.data || views.stride[d - 1] == views.stride[d] * b) && ...);
    if (!merge) {
      --d;
      continue;
    }
    size[d] = a * b;
    ((views.stride[d] = b == 1 ? views.stride[d - 1] : views.stride[d]), ...);
    for (int e = d - 1; e > 0; --e) {  // the dims before move up one
      size[e] = size[e - 1];
      ((views.stride[e] = views.stride[e - 1]), ...);
    }
    size[0] = 1;
    ((views.stride[0] = 0), ...);
    if (d == 1 || std::all_of(size, size + d, [](int64_t s) { return s == 1; })) break;
  }
}

// fn(flat, n, idx) over [begin, end) in runs of at most max_run elements along the last dim;
// idx holds the coordinates of the run's first element.
template <typename F>
inline void for_each_run(at::IntArrayRef size, int64_t begin, int64_t end, int64_t max_run,
                         F&& fn) {
  int64_t idx[4];
  int64_t rest = begin;
  for (int d = 3; d >= 0; --d) {
    idx[d] = rest % size[d];
    rest /= size[d];
  }
  for (int64_t flat = begin; flat < end;) {
    const int64_t n = std::min({max_run, size[3] - idx[3], end - flat});
    fn(flat, n, idx);
    flat += n;
    idx[3] += n;
    for (int d = 3; d > 0 && idx[d] == size[d]; --d) {
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

// What one call of a loss's loop computes: the loss (summed, or stored per element), or the
// gradients times scale * grad_out (w.r.t. input only, or input and target), or (kLossSumGradX)
// the summed loss and the input's gradient in one pass (forward under autograd: see *_fwd_grad).
enum BlockMode : int { kLossSum = 0, kLossStore = 1, kGradX = 2, kGradXY = 3, kLossSumGradX = 4 };

// Element access in the loops: S is the storage type of input, target, grad_out and the outputs
// (float, BFloat16 or double), widened to / narrowed from the accumulation type in registers.
FL_ALWAYS_INLINE float ew_load(float v) { return v; }
FL_ALWAYS_INLINE double ew_load(double v) { return v; }
FL_ALWAYS_INLINE float ew_load(c10::BFloat16 v) { return bf16_to_float(v); }
FL_ALWAYS_INLINE void ew_store(float* p, float v) { *p = v; }
FL_ALWAYS_INLINE void ew_store(double* p, double v) { *p = v; }
FL_ALWAYS_INLINE void ew_store(c10::BFloat16* p, float v) {
  *reinterpret_cast<uint16_t*>(p) = float_to_bf16_bits(v);
}

// One run of n elements for a loss's loop. The lean loop (kFull = false) reads only x and y and
// takes grad_out * scale as gs; the full loop also reads w, pw (acc type; ones where absent) and
// go (per element, S; ones where grad_out is a scalar, folded into gs), each n long. Output
// pointers are null where not wanted.
template <typename S>
struct EwRun {
  using A = acc_type<S>;
  int64_t n = 0;
  const S* x = nullptr;
  const S* y = nullptr;
  const A* w = nullptr;
  const A* pw = nullptr;
  const S* go = nullptr;
  A gs = 0;
  S* loss = nullptr;
  S* gx = nullptr;
  S* gy = nullptr;
};

// grad_out * scale for element i in a loss's grad<kMode, kFull>: per element in the full loop,
// except in the one-pass mode, whose grad_out is always a scalar (already in gs; reading the
// ones there cost a load, a widening and a multiply per element).
template <int kMode, bool kFull, typename S>
FL_ALWAYS_INLINE acc_type<S> ew_go(const EwRun<S>& r, int64_t i) {
  if constexpr (kFull && kMode != kLossSumGradX) return r.gs * ew_load(r.go[i]);
  return r.gs;
}

// One run of a loss's loop in mode kMode: Impl::loss<kFull>(r, i) is element i's loss,
// Impl::grad<kMode, kFull>(r, i) stores element i's gradients (both forced inline; kMode is
// kGradX, kGradXY, or kLossSumGradX for the input's alone, with grad_out from ew_go).
template <int kMode, bool kFull, typename Impl, typename S>
FL_ALWAYS_INLINE acc_type<S> ew_loop(const Impl& loss_impl, const EwRun<S>& run) {
  // Local copies: the stores below cannot alias their fields (else gcc reloads them per
  // element, or leaves the fp32 loss-and-gradient loop scalar)
  const EwRun<S> r = run;
  const Impl impl = loss_impl;
  if constexpr (kMode == kLossSum) {
    return lane_sum<acc_type<S>>(r.n, [&](int64_t i) { return impl.template loss<kFull>(r, i); });
  }
  if constexpr (kMode == kLossSumGradX) {  // one read of each element for both (and, inlined
    return lane_sum<acc_type<S>>(r.n, [&](int64_t i) {  // together, one exp for BCE's two)
      // The loss first: after the gradient's store gcc cannot prove x and y unchanged, and
      // loaded and widened them again (bf16 Huber, AVX2 code: two loads and widenings each).
      const acc_type<S> l = impl.template loss<kFull>(r, i);
      impl.template grad<kLossSumGradX, kFull>(r, i);
      return l;
    });
  }
#pragma omp simd
  for (int64_t i = 0; i < r.n; ++i) {
    if constexpr (kMode == kLossStore) ew_store(r.loss + i, impl.template loss<kFull>(r, i));
    else impl.template grad<kMode, kFull>(r, i);
  }
  return 0;
}

// Dispatches the run-time (mode, full) to ew_loop (forced inline into the caller, an
// FL_MULTIVERSION function per storage type).
template <typename Impl, typename S>
FL_ALWAYS_INLINE acc_type<S> ew_dispatch(const Impl& impl, int mode, bool full,
                                         const EwRun<S>& r) {
  if (full) {
    switch (mode) {
      case kLossSum: return ew_loop<kLossSum, true>(impl, r);
      case kLossStore: return ew_loop<kLossStore, true>(impl, r);
      case kGradX: return ew_loop<kGradX, true>(impl, r);
      case kLossSumGradX: return ew_loop<kLossSumGradX, true>(impl, r);
      default: return ew_loop<kGradXY, true>(impl, r);
    }
  }
  switch (mode) {
    case kLossSum: return ew_loop<kLossSum, false>(impl, r);
    case kLossStore: return ew_loop<kLossStore, false>(impl, r);
    case kGradX: return ew_loop<kGradX, false>(impl, r);
    case kLossSumGradX: return ew_loop<kLossSumGradX, false>(impl, r);
    default: return ew_loop<kGradXY, false>(impl, r);
  }
}

template <typename T>
inline bool all_strides_zero(const View4<T>& v) {
  return v.stride[0] == 0 && v.stride[1] == 0 && v.stride[2] == 0 && v.stride[3] == 0;
}

// Runs an element-wise loss. `block(mode, full, run)` runs the loss's loop over one EwRun (its
// storage type float, BFloat16 or double) and returns the sum of the per-element loss for
// kLossSum. Forward (want_loss): returns the loss, per element in the input dtype or the reduced
// 0-dim value in the acc dtype. Backward (grad_out given, a 4-d view in the input dtype): returns
// the gradients asked for, times grad_out and 1/numel for mean. Both (want_loss and want_gx,
// reduced, no grad_out): the reduced loss and the input's gradient for a grad_out of go_value.
// Unrequested outputs are empty.
template <typename Block>
std::tuple<at::Tensor, at::Tensor, at::Tensor> elementwise_run(
    const char* name, const at::Tensor& x, const at::Tensor& y,
    const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& pw,
    const c10::optional<at::Tensor>& go, int64_t reduction, bool want_loss, bool want_gx,
    bool want_gy, const Block& block, double go_value = 1.0) {
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
  const bool fused = want_loss && want_gx;
  TORCH_CHECK(!fused || (reduction != kReduceNone && !want_gy && !go.has_value()), name,
              ": the loss and its gradient in one pass are for a reduced loss, w.r.t. input only");
  const int64_t numel = x.numel();
  const bool reduce = reduction != kReduceNone;
  const bool grads = want_gx || want_gy;
  at::Tensor loss = !want_loss ? at::empty({0}, x.options())
                    : reduce   ? at::empty({}, x.options().dtype(acc_dtype(x)))
                               : at::empty(x.sizes(), x.options());
  // Gradients from the reused-buffer cache (common.h), as cross-entropy's: a fresh 16 MiB buffer
  // per backward costs page faults or not depending on glibc's heap state.
  at::Tensor gx = empty_reused(want_gx ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor gy = empty_reused(want_gy ? x.sizes() : at::IntArrayRef{0}, x.options());
  if (numel == 0) {
    if (want_loss && reduce) loss.fill_(reduction == kReduceMean ? NAN : 0.0);  // as torch's
    return {loss, gx, gy};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedloss_elementwise", [&] {
    using acc_t = acc_type<scalar_t>;
    // The storage type the loops read in place; fp16 runs go through fp32 buffers.
    constexpr bool kInPlace = !std::is_same_v<scalar_t, c10::Half>;
    using S = std::conditional_t<kInPlace, scalar_t, float>;
    const acc_t scale = reduction == kReduceMean ? acc_t(1) / static_cast<acc_t>(numel) : acc_t(1);
    View4<scalar_t> xv(x), yv(y), gov(go);
    View4<acc_t> wv(w), pwv(pw);
    int64_t sizes[4] = {x.size(0), x.size(1), x.size(2), x.size(3)};
    coalesce_dims(sizes, xv, yv, gov, wv, pwv);
    const at::IntArrayRef size(sizes, 4);
    scalar_t* lp = want_loss && !reduce ? loss.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = want_gx ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = want_gy ? gy.data_ptr<scalar_t>() : nullptr;
    // x and y read in place (size 1 along the last dim: any stride is a run of one)
    const bool direct = kInPlace && (xv.stride[3] == 1 || size[3] == 1) &&
                        (yv.stride[3] == 1 || size[3] == 1);
    const bool go_scalar = grads && all_strides_zero(gov);  // (true without grad_out: go_value)
    const bool full = wv.data || pwv.data || (grads && !go_scalar);
    // grad_out * scale in fp32, as one factor: the same product the per-element form takes
    const acc_t gs =
        go_scalar ? scale * static_cast<acc_t>(gov.data ? static_cast<double>(*gov.data) : go_value)
                  : scale;
    // Whole chunks per call where no operand needs a per-run buffer: weights absent or
    // contiguous acc_t, grad_out absent, scalar or contiguous S.
    auto in_place = [](const auto& v) { return !v.data || v.stride[3] == 1; };
    const bool go_in_place = !grads || go_scalar || (gov.stride[3] == 1 && kInPlace);
    const int64_t max_run = direct && in_place(wv) && in_place(pwv) && go_in_place
                                ? kElemChunk : kBlock;
    const int64_t chunks = (numel + kElemChunk - 1) / kElemChunk;
    std::vector<acc_t> partial(want_loss && reduce ? chunks : 0);
    const int mode = fused       ? kLossSumGradX
                     : want_loss ? (reduce ? kLossSum : kLossStore)
                                 : (want_gy ? kGradXY : kGradX);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      // The full loop's ones (absent weights; grad_out when it is a scalar, folded into gs) and
      // the per-run buffers of the buffered form.
      std::vector<acc_t> ones_acc(full ? max_run : 0, acc_t(1));
      std::vector<S> ones_s(full && go_scalar ? max_run : 0, S(1));
      // kGradXY writes both gradients: the input's goes to scratch when only the target's is wanted
      std::vector<S> gx_scratch(want_gy && !want_gx ? max_run : 0);
      acc_t xb[kBlock], yb[kBlock], wb[kBlock], pb[kBlock], gob[kBlock], lb[kBlock], gxb[kBlock],
          gyb[kBlock];
      S gos[kBlock];
      for (int64_t c = c0; c < c1; ++c) {
        acc_t part = 0;
        for_each_run(size, c * kElemChunk, std::min(numel, (c + 1) * kElemChunk), max_run,
                     [&](int64_t flat, int64_t n, const int64_t* idx) {
          const acc_t* wr = !full ? nullptr : wv.data ? read_run(wv, idx, n, wb) : ones_acc.data();
          const acc_t* pr = !full ? nullptr : pwv.data ? read_run(pwv, idx, n, pb) : ones_acc.data();
          const bool need_go = full && grads;
          if constexpr (kInPlace) {
            if (direct) {
              EwRun<S> r;
              r.n = n;
              r.x = xv.at(idx);
              r.y = yv.at(idx);
              r.w = wr;
              r.pw = pr;
              if (need_go) {
                if (go_scalar) {
                  r.go = ones_s.data();
                } else if (gov.stride[3] == 1) {
                  r.go = gov.at(idx);
                } else {
                  const S* g = gov.at(idx);
                  for (int64_t i = 0; i < n; ++i) gos[i] = g[i * gov.stride[3]];
                  r.go = gos;
                }
              }
              r.gs = gs;
              r.loss = lp ? lp + flat : nullptr;
              r.gx = gxp ? gxp + flat : want_gy ? gx_scratch.data() : nullptr;
              r.gy = gyp ? gyp + flat : nullptr;
              part += block(mode, full, r);
              return;
            }
          }
          // Buffered: x and y (strided, broadcast, or fp16) as fp32 runs; outputs straight into
          // fp32 outputs, else into fp32 buffers stored (narrowed) afterwards.
          constexpr bool kAccOut = std::is_same_v<scalar_t, acc_t>;
          auto out = [&](scalar_t* p, acc_t* buf) -> acc_t* {
            if (!p) return nullptr;
            if constexpr (kAccOut) return reinterpret_cast<acc_t*>(p + flat);
            return buf;
          };
          EwRun<acc_t> r;
          r.n = n;
          r.x = read_run(xv, idx, n, xb);
          r.y = read_run(yv, idx, n, yb);
          r.w = wr;
          r.pw = pr;
          if (need_go) r.go = go_scalar ? ones_acc.data() : read_run(gov, idx, n, gob);
          r.gs = gs;
          r.loss = out(lp, lb);
          r.gx = gxp ? out(gxp, gxb) : want_gy ? gxb : nullptr;
          r.gy = out(gyp, gyb);
          part += block(mode, full, r);
          if constexpr (!kAccOut) {
            if (r.loss) store_block(r.loss, n, lp + flat, 1);
            if (gxp) store_block(r.gx, n, gxp + flat, 1);
            if (r.gy) store_block(r.gy, n, gyp + flat, 1);
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

// The reduced loss (0-dim, acc dtype; reduction 1 mean or 2 sum) and the input's gradient for
// a grad_out of go_value, in one pass over 4-d views as the *_fwd ops take (defined beside
// them). autograd.cpp's CPU path calls these while recording the graph, so that backward has
// nothing left to read when grad_out is 1.
std::tuple<at::Tensor, at::Tensor> bce_fwd_grad(const at::Tensor& input, const at::Tensor& target,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& pos_weight,
                                                int64_t reduction, double go_value);
std::tuple<at::Tensor, at::Tensor> huber_fwd_grad(const at::Tensor& input,
                                                  const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight,
                                                  double delta, bool smooth_l1, int64_t reduction,
                                                  double go_value);
std::tuple<at::Tensor, at::Tensor> kl_div_fwd_grad(const at::Tensor& input,
                                                   const at::Tensor& target, bool log_target,
                                                   int64_t reduction, double go_value);

}  // namespace fusedloss
