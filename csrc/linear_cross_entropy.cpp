// Linear + softmax cross-entropy for LM heads without the [N, V] logits (CPU).
//
// Blocked over tokens: for each block of `block_rows` rows of the input,
//   logits_blk = x_blk @ W^T (+ b)            GEMM 1, into one reused [block_rows, V] buffer
//   (loss, lse) = cross_entropy_fwd(logits_blk)   the fused row kernel (online lse, z-loss...)
// and, when grad_scale is given (the gradient is wanted and its per-row scale known):
//   cross_entropy_bwd_inplace(grad_scale)     dlogits over the same buffer, scale folded in
//   grad_input[blk]  = dlogits @ W            GEMM 2 (rows of the input are disjoint per block)
//   grad_weight     += dlogits^T @ x_blk      GEMM 3 (BLAS beta = 1 after the first block)
//   grad_bias       += column sums of dlogits (accumulated in the acc dtype)
// So one call does 3 GEMMs, like eager linear + cross_entropy (1 forward + 2 backward), and the
// only [*, V] memory is the block. The logits block has the input's dtype, as F.linear's output
// does (bf16 / fp16 GEMMs accumulate in fp32 inside BLAS); the row kernel accumulates in fp32.
// The cross-entropy ops are called through the dispatcher: no header shared with their file.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common.h"

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const OptTensor& weight, int64_t ignore_index,
                                          double eps, double z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedloss::cross_entropy_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                           double, double)>();
  return op.call(logits, target, weight, ignore_index, eps, z);
}

void ce_bwd_inplace(const at::Tensor& scale, at::Tensor& logits, const at::Tensor& target,
                    const at::Tensor& lse, const OptTensor& weight, int64_t ignore_index,
                    double eps, double z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedloss::cross_entropy_bwd_inplace", "")
                       .typed<void(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, int64_t, double, double)>();
  op.call(scale, logits, target, lse, weight, ignore_index, eps, z);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& input, const at::Tensor& linear_weight, const OptTensor& linear_bias,
    const at::Tensor& target, const OptTensor& weight, const OptTensor& grad_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, int64_t block_rows,
    bool need_input, bool need_weight, bool need_bias) {
  TORCH_CHECK(input.dim() == 2 && linear_weight.dim() == 2 &&
                  input.size(1) == linear_weight.size(1),
              "fusedloss::linear_cross_entropy: input [N, D] and linear_weight [V, D] expected");
  TORCH_CHECK(input.scalar_type() == linear_weight.scalar_type(),
              "fusedloss::linear_cross_entropy: input and linear_weight must have one dtype");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.numel() == input.size(0) && target.is_contiguous(),
              "fusedloss::linear_cross_entropy: target must be contiguous int64 [N]");
  TORCH_CHECK(block_rows > 0, "fusedloss::linear_cross_entropy: block_rows must be positive");
  const bool has_bias = linear_bias.has_value() && linear_bias->defined();
  if (has_bias) {
    TORCH_CHECK(linear_bias->dim() == 1 && linear_bias->size(0) == linear_weight.size(0) &&
                    linear_bias->scalar_type() == input.scalar_type(),
                "fusedloss::linear_cross_entropy: linear_bias must be [V] in the input's dtype");
  }
  const int64_t n = input.size(0), d = input.size(1), v = linear_weight.size(0);
  const auto acc = acc_of(input);
  const bool grads = grad_scale.has_value() && grad_scale->defined();
  if (grads) {
    TORCH_CHECK(grad_scale->scalar_type() == acc && grad_scale->is_contiguous() &&
                    (grad_scale->numel() == 1 || grad_scale->numel() == n),
                "fusedloss::linear_cross_entropy: grad_scale must be a scalar or one per row, "
                "in the accumulation dtype");
  }
  need_input = grads && need_input;
  need_weight = grads && need_weight;
  need_bias = grads && need_bias && has_bias;

  at::Tensor loss = at::empty({n}, input.options().dtype(acc));
  at::Tensor gi = at::empty({need_input ? n : 0, need_input ? d : 0}, input.options());
  at::Tensor gw =
      need_weight ? at::zeros({v, d}, input.options()) : at::empty({0, 0}, input.options());
  at::Tensor gb_acc = need_bias ? at::zeros({v}, input.options().dtype(acc)) : at::Tensor();
  const at::Tensor wt = linear_weight.t();  // [D, V] view: BLAS reads W transposed, no copy

  const int64_t rows = std::min(block_rows, n);
  at::Tensor buf = fusedloss::empty_reused({rows, v}, input.options());
  for (int64_t r = 0; r < n; r += rows) {
    const int64_t nb = std::min(rows, n - r);
    at::Tensor x_blk = input.narrow(0, r, nb);
    at::Tensor logits = buf.narrow(0, 0, nb);  // the first nb rows: contiguous
    if (has_bias) {
      at::addmm_out(logits, *linear_bias, x_blk, wt);
    } else {
      at::mm_out(logits, x_blk, wt);
    }
    at::Tensor t_blk = target.narrow(0, r, nb);
    at::Tensor l3 = logits.unsqueeze(-1);  // [nb, V, 1] as the row kernel wants
    auto [loss_blk, lse_blk] = ce_fwd(l3, t_blk, weight, ignore_index, label_smoothing, z_loss);
    loss.narrow(0, r, nb).copy_(loss_blk);
    if (!grads || !(need_input || need_weight || need_bias)) continue;
    at::Tensor scale =
        grad_scale->numel() == 1 ? *grad_scale : grad_scale->narrow(0, r, nb);
    ce_bwd_inplace(scale, l3, t_blk, lse_blk, weight, ignore_index, label_smoothing, z_loss);
    if (need_input) {
      at::Tensor gi_blk = gi.narrow(0, r, nb);
      at::mm_out(gi_blk, logits, linear_weight);
    }
    if (need_weight) {
      gw.addmm_(logits.t(), x_blk);
    }
    if (need_bias) {
      gb_acc.add_(at::sum(logits, {0}, false, acc));
    }
  }
  at::Tensor gb =
      need_bias ? gb_acc.to(linear_bias->scalar_type()) : at::empty({0}, input.options());
  return {loss, gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
}
