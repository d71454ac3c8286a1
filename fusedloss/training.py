"""Gradient clipping and a training step that owns the order of the operations around a loss.

Functional layer (all results are fp32 device tensors; nothing here reads a value on the host):

    global_norm(tensors, norm_type)            norm of the concatenation of the tensors
    grad_norm(parameters, norm_type)           global_norm of the parameters' .grad
    clip_coef(total_norm, max_norm)            min(max_norm / (total_norm + 1e-6), 1)
    scale_grads_(parameters, scale)            grad *= scale (a float or a device tensor)
    clip_grad_norm_(parameters, max_norm)      as torch.nn.utils.clip_grad_norm_, norm in fp32
    clip_grad_value_(parameters, clip_value)   as torch.nn.utils.clip_grad_value_
    adaptive_clip_grad_(parameters, ...)       unit-wise adaptive gradient clipping (NFNets' AGC)

TrainStep runs one micro-batch per call; see its docstring for the order it keeps.
"""
import contextlib
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = [
    "global_norm", "grad_norm", "clip_coef", "scale_grads_", "clip_grad_norm_", "clip_grad_value_",
    "unitwise_norm", "adaptive_clip_grad_", "StepResult", "TrainStep",
]

CLIP_MODES = ("auto", None, "norm", "value", "agc")
# The options each clip mode takes; clip="auto" picks the mode whose options were given.
_CLIP_OPTIONS = {"norm": ("max_norm",), "value": ("clip_value",),
                 "agc": ("agc_clipping", "agc_eps", "agc_exclude")}


# ----------------------------------------------------------------------------- argument checks
def _grads(parameters):
    """The .grad of every parameter that has one (one pass: thousands of parameters are common)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in _iterable(parameters, "parameters"):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must hold tensors, got {type(p).__name__}")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _iterable(obj, name):
    try:
        return iter(obj)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, "
                        f"got {type(obj).__name__}") from None


def _norm_type(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if not p > 0:  # also rejects NaN
        raise ValueError(f"norm_type must be > 0 (e.g. 1, 2 or inf), got {norm_type!r}")
    return p


def _positive(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _by_device(tensors, name="tensors"):
    """Non-empty floating-point tensors grouped by device, checked in the same pass."""
    groups = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must hold floating-point tensors, got {got}")
        if t.numel():  # empty tensors add nothing (and _foreach_norm rejects them for inf)
            groups.setdefault(t.device, []).append(t)
    return groups


# ----------------------------------------------------------------------------- functional layer
@torch.no_grad()
def global_norm(tensors, norm_type=2.0) -> torch.Tensor:
    """p-norm of all the tensors as if concatenated into one vector, as a 0-d fp32 tensor on the
    first tensor's device. Computed in fp32 whatever the tensors' dtype (an fp16 norm overflows at
    65504), with one fused _foreach_norm call per device. inf/NaN propagate; no host sync."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    p = _norm_type(norm_type)
    groups = _by_device(_iterable(tensors, "tensors"))
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    per_device = [torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm(ts, p, dtype=torch.float32)), p) for ts in groups.values()]
    if len(per_device) == 1:
        return per_device[0]
    first = per_device[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in per_device]), p)


def grad_norm(parameters, norm_type=2.0) -> torch.Tensor:
    """global_norm of the gradients of `parameters` (those whose .grad is None are left out)."""
    return global_norm(_grads(parameters), norm_type)


def clip_coef(total_norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """The factor clip_grad_norm_ multiplies gradients by: min(max_norm / (total_norm + eps), 1),
    as torch.nn.utils.clip_grad_norm_ defines it (fp32 device tensor; NaN for a NaN norm)."""
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a tensor, got {type(total_norm).__name__}")
    max_norm = _positive("max_norm", max_norm)
    return torch.clamp(max_norm / (total_norm.float() + eps), max=1.0)


def scale_grads_(parameters, scale) -> None:
    """grad *= scale for every parameter with a gradient; `scale` is a float or a 0-d tensor
    (kept on the device: no host sync)."""
    _scale_(_grads(parameters), scale)


@torch.no_grad()
def _scale_(grads, scale):
    for dev, ts in _by_device(grads, "gradients").items():
        torch._foreach_mul_(ts, scale.to(dev) if isinstance(scale, torch.Tensor) else scale)


def clip_grad_norm_(parameters, max_norm: float, norm_type=2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm taken in fp32; returns the pre-clip norm.
    (The returned norm is fp32; torch's has the gradients' dtype.)"""
    grads = _grads(parameters)
    total = global_norm(grads, norm_type)
    _scale_(grads, clip_coef(total, max_norm))
    return total


@torch.no_grad()
def clip_grad_value_(parameters, clip_value: float) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every gradient to [-clip_value, clip_value]."""
    clip_value = _positive("clip_value", clip_value)
    for grads in _by_device(_grads(parameters), "gradients").values():
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm per output unit, as AGC defines it: the whole tensor for scalars and vectors
    (biases, gains), else one norm per slice along dim 0 (a Linear row, a conv output channel),
    kept broadcastable against x."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=torch.float32)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True,
                                    dtype=torch.float32)


def _param_ids(exclude):
    """ids of the parameters in `exclude`: parameters, modules (all their parameters), or a mix."""
    if isinstance(exclude, (nn.Module, torch.Tensor)):
        exclude = [exclude]
    ids = set()
    for item in exclude:
        if isinstance(item, nn.Module):
            ids.update(id(p) for p in item.parameters())
        elif isinstance(item, torch.Tensor):
            ids.add(id(item))
        else:
            raise TypeError(f"exclude must hold parameters or modules, got {type(item).__name__}")
    return ids


@torch.no_grad()
def adaptive_clip_grad_(parameters, clipping: float = 0.01, eps: float = 1e-3, *,
                        exclude=()) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise: for every unit i of every
    parameter W with gradient G,

        max_i = clipping * max(||W_i||, eps);   if ||G_i|| > max_i: G_i *= max_i / ||G_i||

    (||G_i|| floored at 1e-6 in the division, as in the paper's code)

    `exclude` (parameters and/or modules) is left unclipped: the paper does not clip the final
    classifier layer. Norms in fp32, no host sync."""
    clipping = _positive("clipping", clipping)
    eps = _positive("eps", eps)
    skip = _param_ids(exclude)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in _iterable(parameters, "parameters"):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must hold tensors, got {type(p).__name__}")
        if p.grad is None or id(p) in skip:
            continue
        max_norm = unitwise_norm(p).clamp_min(eps) * clipping
        g_norm = unitwise_norm(p.grad)
        # where() rather than an if: no host sync; a NaN norm compares False and keeps the NaN
        # gradient, so the step that follows sees it and is skipped.
        p.grad.mul_(torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0))


# ----------------------------------------------------------------------------- TrainStep
@dataclass
class StepResult:
    """What one TrainStep call returns. Tensors stay on the device: reading them (.item(),
    float(), print) is the caller's host sync, made when the caller wants it."""

    loss: torch.Tensor  # this micro-batch's loss as loss_fn returned it, detached
    stepped: bool  # this call ended an accumulation window (an optimizer step was attempted)
    accum_loss: Optional[torch.Tensor] = None  # the window's loss as optimised: mean over
    #   micro-batches, or (num_items mode) sum of losses / sum of num_items; on this rank
    grad_norm: Optional[torch.Tensor] = None  # fp32 global norm before clipping (after unscale_)
    clip_coef: Optional[torch.Tensor] = None  # factor the gradient norm was scaled by (1 = none)
    skipped: Optional[torch.Tensor] = None  # bool: gradient not finite, optimizer step skipped


class TrainStep:
    """One micro-batch per call, keeping the order of a PyTorch training step:

        forward + loss under autocast (fp32, bf16, or fp16 with a GradScaler), backward of the
        loss normalised for accumulation, without gradient communication except on the window's
        last micro-batch (DDP / FSDP1: inside no_sync(); FSDP2: set_requires_gradient_sync(False));
        at the accumulation boundary:
        scaler.unscale_ -> (num_items mode) divide by the window's item count -> fp32 global norm
        -> clip (norm / value / agc / none) -> optimizer step, skipped if the norm is not finite
        -> scaler.update -> scheduler.step -> zero_grad.

    Args:
        model, optimizer, loss_fn: loss_fn(model(input), target) must return a 0-d tensor.
        accum_steps: micro-batches per optimizer step.
        clip: "norm" (max_norm, norm_type: as torch.nn.utils.clip_grad_norm_), "value"
            (clip_value: as clip_grad_value_), "agc" (agc_clipping, default 0.01; agc_eps, default
            1e-3; agc_exclude: parameters or modules left unclipped, e.g. the final layer), None
            (no clipping: the norm is measured only), or "auto" (the default): the mode whose
            option is given, so max_norm=1.0 alone clips the norm as clip_grad_norm_ does, and no
            option means no clipping. An option of another mode than `clip` (clip="value" with
            max_norm, clip=None with max_norm, or "auto" with options of two modes) is a
            ValueError: a threshold is never silently ignored.
        amp_dtype: None or torch.float32 (no autocast), torch.bfloat16, or torch.float16; fp16
            creates torch.amp.GradScaler(device) unless `scaler` is given.
        scheduler: stepped once per boundary, skipped steps included (as in PyTorch's AMP recipe;
            the schedule follows the data, and needs no host sync to decide).
        max_consecutive_skips: RuntimeError once this many optimizer steps in a row were skipped
            for a non-finite gradient (None: never). The default leaves room for fp16's scale
            search.

    Accumulation normalisation: by default each micro-batch's loss (a mean) is divided by
    accum_steps, so equal micro-batches give the update of one batch accum_steps times larger.
    For summed losses (reduction="sum") pass num_items= (e.g. the number of non-ignored tokens,
    a device tensor) on every micro-batch: the gradients are divided by the window's total at the
    boundary (under DDP or FSDP2 the total over all data-parallel ranks), i.e. the mean over all
    valid items. A window with no items at all gets a NaN gradient, so its step is skipped (and
    counted).

    Data parallel: a model with no_sync() (DDP, FSDP1) runs the window's other micro-batches
    inside it. Under FSDP2 (fully_shard on the model or on any of its submodules) every sharded
    module gets set_requires_gradient_sync(False) for those micro-batches (backward keeps the
    unsharded gradients locally) and True for the last one, whose backward reduce-scatters the
    window's gradient once; the flag is True again after every call. The parameters' all-gathers
    stay per micro-batch: resharding after backward is what keeps FSDP's memory low, and TrainStep
    leaves set_reshard_after_backward alone (it must be True for the window's last backward:
    with False, the optimizer steps the shards and the next forward reads the stale unsharded
    parameters).

    Host syncs: none on micro-steps. At a boundary: none when the optimizer takes a found_inf
    tensor (fused=True Adam/AdamW/SGD: the skip happens on the device); otherwise one bool read to
    decide the skip, as GradScaler.step makes. The skip limit reads the counter once every
    max_consecutive_skips boundaries at most, while no skip has been seen.
    """

    def __init__(self, model, optimizer, loss_fn, *, accum_steps=1, clip="auto", max_norm=None,
                 norm_type=2.0, clip_value=None, agc_clipping=None, agc_eps=None, agc_exclude=None,
                 amp_dtype=None, scaler=None, scheduler=None, max_consecutive_skips=50):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be an int >= 1, got {accum_steps!r}")
        clip = _clip_mode(clip, max_norm=max_norm, clip_value=clip_value,
                          agc_clipping=agc_clipping, agc_eps=agc_eps, agc_exclude=agc_exclude)
        if clip == "norm" and max_norm is None:
            raise ValueError("max_norm is required when clip='norm'")
        if clip == "value" and clip_value is None:
            raise ValueError("clip_value is required when clip='value'")
        self.max_norm = None if max_norm is None else _positive("max_norm", max_norm)
        self.clip_value = None if clip_value is None else _positive("clip_value", clip_value)
        self.agc_clipping = _positive("agc_clipping", 0.01 if agc_clipping is None
                                      else agc_clipping)
        self.agc_eps = _positive("agc_eps", 1e-3 if agc_eps is None else agc_eps)
        self._agc_exclude = list(_param_ids_as_params(
            model, () if agc_exclude is None else agc_exclude))
        self.norm_type = _norm_type(norm_type)
        if amp_dtype == torch.float32:
            amp_dtype = None
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError("amp_dtype must be None, torch.float32, torch.bfloat16 or "
                             f"torch.float16; got {amp_dtype!r}")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        limit = max_consecutive_skips
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"max_consecutive_skips must be None or an int >= 1, got {limit!r}")
        param = next(model.parameters(), None)
        if param is None:
            raise ValueError("model has no parameters")
        self.device_type = param.device.type
        if scaler is None and amp_dtype == torch.float16:
            scaler = torch.amp.GradScaler(self.device_type)
        self.model, self.optimizer, self.loss_fn, self.scheduler, self.scaler = (
            model, optimizer, loss_fn, scheduler, scaler)
        self.accum_steps, self.clip, self.amp_dtype = accum_steps, clip, amp_dtype
        self.max_consecutive_skips = max_consecutive_skips
        # Fused optimizers take found_inf and skip on the device (what GradScaler relies on).
        self._device_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        # FSDP2 has no no_sync(): each fully_shard module carries its own gradient-sync flag.
        self._fsdp2 = [] if hasattr(model, "no_sync") else _fsdp2_modules(model)
        self.steps = 0  # boundaries so far (optimizer steps attempted)
        self.micro_step = 0  # position in the current accumulation window
        self._consecutive = torch.zeros((), dtype=torch.int64, device=param.device)
        self._skipped_total = torch.zeros((), dtype=torch.int64, device=param.device)
        self._known, self._unverified = 0, 0  # host bound on the consecutive-skip counter
        self._loss_sum = self._items = None
        self._summed = False

    @property
    def consecutive_skips(self) -> torch.Tensor:
        return self._consecutive

    @property
    def skipped_steps(self) -> torch.Tensor:
        return self._skipped_total

    def _forward(self, input, target):
        amp = self.amp_dtype is not None
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=amp):
            if isinstance(input, tuple):
                out = self.model(*input)
            elif isinstance(input, dict):
                out = self.model(**input)
            else:
                out = self.model(input)
            loss = self.loss_fn(out, target)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a 0-d tensor (reduction 'mean' or 'sum'), "
                             f"got {got}")
        return loss

    def __call__(self, input, target, *, num_items=None) -> StepResult:
        if self.micro_step == 0:
            self.optimizer.zero_grad(set_to_none=True)  # never accumulate into stale gradients
            self._summed, self._loss_sum, self._items = num_items is not None, None, None
        elif (num_items is not None) != self._summed:
            raise ValueError("num_items must be given on every micro-batch of an accumulation "
                             "window, or on none")
        boundary = self.micro_step + 1 == self.accum_steps
        no_sync = getattr(self.model, "no_sync", None)
        # DDP reads its sync flag in forward too, so no_sync covers forward and backward.
        if self._fsdp2:
            ctx = _fsdp2_sync(self._fsdp2, boundary)
        elif no_sync is not None and not boundary:
            ctx = no_sync()
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            loss = self._forward(input, target)
            if self._summed:
                items = _items_tensor(num_items, loss.device)
                self._items = items if self._items is None else self._items + items
                scaled = loss
            else:
                scaled = loss / self.accum_steps
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        loss = loss.detach()
        self._loss_sum = loss.float() if self._loss_sum is None else self._loss_sum + loss.float()
        self.micro_step += 1
        if not boundary:
            return StepResult(loss=loss, stepped=False)
        self.micro_step = 0
        return self._boundary(loss)

    def _boundary(self, loss) -> StepResult:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # before any norm: clip the true gradient
        if self._summed:
            accum_loss = self._loss_sum / self._items
            total = self._items
            if self._ddp or self._fsdp2:
                # The ranks' summed gradients were averaged: * world size / global total.
                total = _mean_over_ranks(total, self.model, params, self._ddp)
            _scale_(_grads(params), 1.0 / total)
        else:
            accum_loss = self._loss_sum / self.accum_steps
        # .to: a no-op, except when no parameter has a gradient (a CPU zero)
        norm = _local(grad_norm(params, self.norm_type)).to(self._consecutive.device)
        skipped = ~torch.isfinite(norm)  # decided before clipping: value clipping hides an inf
        coef = self._clip(params, norm)
        skipped_host = self._optimizer_step(skipped)
        if self.scaler is not None:
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._consecutive = (self._consecutive + 1) * skipped
        self._skipped_total = self._skipped_total + skipped
        self._check_skip_limit(skipped_host)
        return StepResult(loss=loss, stepped=True, accum_loss=accum_loss, grad_norm=norm,
                          clip_coef=coef, skipped=skipped)

    def _clip(self, params, norm):
        if self.clip is None:
            return torch.ones_like(norm)
        if self.clip == "norm":
            coef = clip_coef(norm, self.max_norm)
            _scale_(_grads(params), coef)
            return coef
        if self.clip == "value":
            clip_grad_value_(params, self.clip_value)
        else:
            adaptive_clip_grad_(params, self.agc_clipping, self.agc_eps, exclude=self._agc_exclude)
        # No single factor for value / AGC clipping: report the norm ratio after / before.
        return torch.where(norm > 0, _local(grad_norm(params, self.norm_type)) / norm, 1.0)

    def _optimizer_step(self, skipped) -> Optional[bool]:
        if self._device_skip:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skipped.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
            return None
        # A Python optimizer's step cannot be made conditional on a device value: one host read.
        skipped_host = bool(skipped)
        if not skipped_host:
            self.optimizer.step()
        return skipped_host

    def _check_skip_limit(self, skipped_host) -> None:
        limit = self.max_consecutive_skips
        if skipped_host is False:
            self._known, self._unverified = 0, 0
            return
        self._unverified += 1
        if limit is None or self._known + self._unverified < limit:
            return  # the counter cannot have reached the limit yet: no need to read it
        self._known, self._unverified = int(self._consecutive), 0
        if self._known >= limit:
            raise RuntimeError(
                f"TrainStep: {self._known} optimizer steps in a row were skipped because the "
                f"gradient was not finite (inf/NaN) (max_consecutive_skips={limit}). Check the "
                "data, the loss and the learning rate, or raise max_consecutive_skips.")

    def state_dict(self) -> dict:
        """TrainStep's own state: step counters and the GradScaler's state. The model, optimizer
        and scheduler keep their own state_dicts. Only at a step boundary: the gradients
        accumulated inside a window are not part of any state_dict."""
        if self.micro_step:
            raise RuntimeError("TrainStep.state_dict() called inside an accumulation window "
                               f"(micro-step {self.micro_step} of {self.accum_steps}); call it "
                               "after a call whose result has stepped=True")
        return {"steps": self.steps, "consecutive_skips": self._consecutive.clone(),
                "skipped_steps": self._skipped_total.clone(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); a window in progress is dropped (the next call starts anew)."""
        missing = {"steps", "consecutive_skips", "skipped_steps", "scaler"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        if state["scaler"] is not None:
            if self.scaler is None:
                raise ValueError("state holds a GradScaler state but this TrainStep has no scaler "
                                 "(use amp_dtype=torch.float16 or pass scaler=)")
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state["steps"])
        self._consecutive = torch.as_tensor(state["consecutive_skips"]).to(self._consecutive.device)
        self._skipped_total = torch.as_tensor(state["skipped_steps"]).to(self._skipped_total.device)
        self._known, self._unverified = int(self._consecutive), 0  # a host read, outside any step
        self.micro_step, self._loss_sum, self._items = 0, None, None


def _fsdp2_modules(model):
    """The modules of `model`, itself included, sharded with fully_shard (FSDP2). fully_shard
    comes from torch.distributed.fsdp: if nothing imported that, no module can be sharded by it
    (and importing it here would cost seconds in every program)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


@contextlib.contextmanager
def _fsdp2_sync(modules, sync):
    """FSDP2's no_sync() when `sync` is False: backward accumulates the unsharded gradients
    locally instead of reduce-scattering them. With `sync` True (the boundary) the flag is set
    explicitly, so the window's gradient is reduced even if someone turned it off. Restored on
    exit, as no_sync() is, so that an abandoned window cannot leave the model silently
    unsynchronised. (set_is_last_backward(False) is for pipelining, which runs FSDP's
    post-backward itself: here it keeps the micro-step's prefetch order, and the boundary's
    backward then all-gathers one module too many.)"""
    def set_sync(flag):
        for m in modules:  # each module's own flag: the model may have no fully_shard root
            m.set_requires_gradient_sync(flag, recurse=False)

    set_sync(sync)
    try:
        yield
    finally:
        if not sync:
            set_sync(True)


def _local(t):
    """A DTensor result (a norm of FSDP2's sharded gradients, already reduced) as a plain tensor."""
    full_tensor = getattr(t, "full_tensor", None)
    return t if full_tensor is None else full_tensor()


def _mean_over_ranks(total, model, params, ddp):
    """Mean of `total` over the data-parallel ranks, the divisor DDP and FSDP2 apply to the
    gradients. DDP: its process group. FSDP2: the device mesh of its sharded (DTensor) parameters;
    a tensor-parallel dimension in that mesh sees the same batch, so it changes neither the mean
    nor the result."""
    import torch.distributed as dist

    total = total.clone()
    if ddp:
        dist.all_reduce(total, group=model.process_group)
        return total / dist.get_world_size(model.process_group)
    mesh = next((p.device_mesh for p in params if hasattr(p, "device_mesh")), None)
    if mesh is None:  # no sharded parameter in the optimizer: FSDP2's default, the world
        dist.all_reduce(total)
        return total / dist.get_world_size()
    for dim in range(mesh.ndim):
        dist.all_reduce(total, group=mesh.get_group(dim))
    return total / mesh.size()


def _clip_mode(clip, **options):
    """The clip mode TrainStep runs: `clip` itself, or for "auto" the mode whose options were given
    (none: no clipping). An option that the mode does not use is an error, not ignored."""
    if not (clip is None or isinstance(clip, str)) or clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of 'auto', None, 'norm', 'value', 'agc'; got {clip!r}")
    given = [name for name, value in options.items() if value is not None]
    modes = [m for m, names in _CLIP_OPTIONS.items() if any(n in given for n in names)]
    if clip == "auto":
        if len(modes) > 1:
            raise ValueError(f"clip='auto' takes the clipping mode from its options, but "
                             f"{', '.join(given)} belong to different modes ({', '.join(modes)}); "
                             "pass clip='norm', 'value' or 'agc' with that mode's options only")
        clip = modes[0] if modes else None
    stray = [n for n in given if n not in _CLIP_OPTIONS.get(clip, ())]
    if stray:
        takes = "; ".join(f"clip='{m}' takes {', '.join(names)}"
                          for m, names in _CLIP_OPTIONS.items())
        raise ValueError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not used with "
                         f"clip={clip!r} ({takes})")
    return clip


def _param_ids_as_params(model, exclude):
    """The model's parameters named by `exclude` (parameters and/or modules), checked to belong
    to the model so that a typo cannot silently exclude nothing."""
    ids = _param_ids(exclude)
    found = [p for p in model.parameters() if id(p) in ids]
    if len(found) != len(ids):
        raise ValueError("agc_exclude holds parameters that are not the model's")
    return found


def _items_tensor(num_items, device) -> torch.Tensor:
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must hold one value, got shape {tuple(num_items.shape)}")
        return num_items.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)) or not num_items >= 0:
        raise ValueError(f"num_items must be a tensor or a number >= 0, got {num_items!r}")
    return torch.tensor(float(num_items), device=device)
