"""Batch norm + residual add + ReLU as Triton kernels (`norm="triton"`): the same values in fewer passes over memory.

On an H200 a training step of R50-D8 (512x512, batch 8, bf16, channels_last) spent ~11 ms in PyTorch's batch-norm
kernels and ~4 ms more in the ReLUs and residual adds around them (profile in benchmarks/RESULTS.md), against ~16 ms
of convolutions. Those 60 batch norms see 2.3 GB of bf16 activations per step; PyTorch reads or writes them 8 times in
batch norm (statistics, normalise; the backward's two reductions and its elementwise pass) and 5 more in each ReLU
(in-place forward, `threshold_backward`) and 3 in each residual add. Here one autograd function does

    forward:  y = relu(batchnorm(x) [+ residual])      x read twice (statistics, then normalise), y written once
    backward: dx, dweight, dbias [, dresidual]          x and dy read twice, dx written once

so the ReLU's mask is recomputed from x (or, after a residual add, read from y), never stored or applied in a pass
of its own. Prediction for that step: ~8 ms less (the ReLU and add passes, and batch norm at the copy rate instead
of PyTorch's ~1.7 TB/s). Not yet measured on a GPU (`danet benchmark --norm triton`; the GPU suite's
`train_bf16_cl_tritonloss_tritonbn` case).

Statistics: each program reduces a block of rows of the (rows = N*H*W, channels) view to a centred partial (count,
mean, sum of squared deviations), partials combined with Chan's formula in a second kernel that also updates the
running statistics (unbiased variance, momentum) as `nn.BatchNorm2d` does. No atomics: the same input gives the same
bits. Accumulation in float32 (float64 for float64 tensors), as PyTorch's kernels do.

`use_fused_norm(model)` swaps every `nn.BatchNorm2d` for `FusedBatchNorm2d` (a subclass: the same parameters,
buffers and state-dict keys) and the model's blocks route batch norm + ReLU pairs through `bn_relu`. Whatever the
kernels do not cover runs PyTorch's batch norm unchanged: CPU tensors (unless TRITON_INTERPRET=1), other layouts
than NCHW- or NHWC-contiguous, evaluation with gradients, `torch.compile` tracing (inductor fuses these itself).
Under torchrun `sync_fused_norm` (engine/distributed.py, instead of `nn.SyncBatchNorm`) makes the statistics span
the processes: each one's (count, mean, M2) gathered and merged, the backward's two sums all-reduced; dweight and
dbias stay local, as in `nn.SyncBatchNorm` (DDP averages them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DanetError, note
from .norm_kernels import interpreted, triton

if triton is not None:  # NOTE: the kernels exist where Triton does
    from .norm_kernels import bn_apply, bn_backward_apply, bn_backward_reduce, bn_combine_stats, bn_partial_stats

TARGET_PROGRAMS = 2048  # statistics / reductions: rows per program grow until about this many programs run
MAX_ITERS = 32


def _layout(x: torch.Tensor) -> bool | None:
    """True: NHWC-contiguous, False: NCHW-contiguous, None: neither (PyTorch's kernels then)."""
    if x.is_contiguous():  # NOTE: first: a (N, C, 1, 1) or C == 1 tensor is both, NCHW addressing is right then
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def _blocks(m: int, c: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, iters, programs along the rows) for the reductions over an (m, c) view."""
    block_c = min(64, triton.next_power_of_2(c))
    block_m = min(128, max(64, 4096 // block_c))
    tiles = triton.cdiv(m, block_m)
    iters = max(1, min(MAX_ITERS, tiles * triton.cdiv(c, block_c) // TARGET_PROGRAMS))
    return block_m, block_c, iters, triton.cdiv(tiles, iters)


def _scalars(bn: nn.BatchNorm2d, dtype: torch.dtype, device: torch.device, factor: float) -> torch.Tensor:
    """[eps, momentum factor] on the device in the accumulation dtype (full precision, unlike a kernel's float
    argument, which Triton passes as float32). Cached per module: no host-to-device copy per call."""
    key = (dtype, device, bn.eps, factor)
    cache = bn.__dict__.setdefault("_fused_scalars", {})
    t = cache.get(key)
    if t is None:
        if len(cache) > 8:  # momentum=None (a cumulative average) gives a new factor every step
            cache.clear()
        t = cache[key] = torch.tensor([bn.eps, factor], dtype=dtype, device=device)
    return t


def _merge_processes(mean, m2, m: int, bn: nn.BatchNorm2d, factor: float, group) -> tuple:
    """Synchronised batch norm: every process's (count, mean, M2) gathered and merged (Chan's formula, in rank
    order: the same on every process); returns the global mean, 1/std and count (a tensor: no host sync) and updates
    the running statistics with the global unbiased variance, as `nn.SyncBatchNorm` does."""
    local = torch.cat([mean.new_full((1,), m), mean, m2])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    c = mean.numel()
    n, means, m2s = g[:, :1], g[:, 1 : 1 + c], g[:, 1 + c :]
    total = n.sum()
    mean = (n * means).sum(0) / total
    m2 = (m2s + n * (means - mean).square()).sum(0)
    invstd = 1.0 / torch.sqrt(m2 / total + bn.eps)
    with torch.no_grad():
        bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = (m2 / (total - 1).clamp(min=1)).to(bn.running_var.dtype)
        bn.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
    return mean, invstd, total


class _FusedBatchNormAct(torch.autograd.Function):
    """relu(batch_norm(x) [+ residual]) in training mode, with the running statistics updated; `group`: the
    statistics and the backward's two sums over all its processes (synchronised batch norm)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, bn, relu, group):
        cl = _layout(x)
        n, c, h, w = x.shape
        m, hw = n * h * w, h * w
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        block_m, block_c, iters, p = _blocks(m, c)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        scalars = _scalars(bn, acc, x.device, factor)
        mean_p = torch.empty(p, c, dtype=acc, device=x.device)
        m2_p = torch.empty_like(mean_p)
        bn_partial_stats[(p, triton.cdiv(c, block_c))](
            x, mean_p, m2_p, m, c, hw, iters, CL=cl, BLOCK_M=block_m, BLOCK_C=block_c
        )
        mean = torch.empty(c, dtype=acc, device=x.device)
        invstd = torch.empty_like(mean)
        bn_combine_stats[(triton.cdiv(c, block_c),)](
            mean_p,
            m2_p,
            scalars,
            mean,
            invstd,
            bn.running_mean,
            bn.running_var,
            p,
            m,
            c,
            iters * block_m,
            LOCAL=group is not None,
            BLOCK_P=min(64, triton.next_power_of_2(p)),
            BLOCK_C=block_c,
        )
        count = m
        if group is not None:  # `invstd` holds this process's M2
            mean, invstd, count = _merge_processes(mean, invstd, m, bn, factor, group)
        y = torch.empty_like(x)
        grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
        r = residual if residual is not None else x
        bn_apply[grid](
            x,
            r,
            y,
            mean,
            invstd,
            weight,
            bias,
            scalars,
            m,
            c,
            hw,
            CL=cl,
            HAS_RES=residual is not None,
            RELU=relu,
            FROM_VAR=False,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
        )
        mask_from_y = relu and residual is not None
        ctx.save_for_backward(x, y if mask_from_y else None, weight, bias, mean, invstd)
        ctx.conf = (cl, relu, mask_from_y, residual is not None, group, count)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, bias, mean, invstd = ctx.saved_tensors
        cl, relu, mask_from_y, has_res, group, count = ctx.conf
        n, c, h, w = x.shape
        m, hw = n * h * w, h * w
        dy = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        block_m, block_c, iters, p = _blocks(m, c)
        sums = torch.empty(2, p, c, dtype=mean.dtype, device=x.device)
        dz = torch.empty_like(dy) if has_res and relu else None
        bn_backward_reduce[(p, triton.cdiv(c, block_c))](
            dy,
            x,
            y if y is not None else x,
            dz if dz is not None else dy,
            mean,
            invstd,
            weight,
            bias,
            sums,
            m,
            c,
            hw,
            p,
            iters,
            CL=cl,
            RELU=relu,
            MASK_FROM_Y=mask_from_y,
            WRITE_DZ=dz is not None,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
        )
        total = sums.sum(1)  # (2, C), in a fixed order
        means, count_arg = total, count
        if group is not None:  # dx takes the sums over every process; dweight, dbias stay local (DDP averages them)
            means = total.clone()
            dist.all_reduce(means, group=group)
            means, count_arg = means / count, 1
        dx = torch.empty_like(x)
        upstream = dz if dz is not None else dy  # with dz, the ReLU is already applied
        grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
        bn_backward_apply[grid](
            upstream,
            x,
            x,
            dx,
            mean,
            invstd,
            weight,
            bias,
            means,
            count_arg,
            m,
            c,
            hw,
            CL=cl,
            RELU=relu and dz is None,
            MASK_FROM_Y=False,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
        )
        d_res = (dz if dz is not None else dy) if has_res else None
        dw = total[1].to(weight.dtype) if ctx.needs_input_grad[2] else None
        db = total[0].to(bias.dtype) if ctx.needs_input_grad[3] else None
        return dx, d_res, dw, db, None, None, None


def _eval_apply(bn: nn.BatchNorm2d, x: torch.Tensor, residual, relu: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_m, block_c, _, _ = _blocks(n * h * w, c)
    y = torch.empty_like(x)
    grid = (triton.cdiv(n * h * w, block_m), triton.cdiv(c, block_c))
    bn_apply[grid](
        x,
        residual if residual is not None else x,
        y,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        _scalars(bn, acc, x.device, 0.0),
        n * h * w,
        c,
        h * w,
        CL=_layout(x),
        HAS_RES=residual is not None,
        RELU=relu,
        FROM_VAR=True,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    return y


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FusedBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose forward (and `forward_act`: + residual + ReLU) runs the Triton kernels where they apply,
    PyTorch's batch norm elsewhere. Same parameters, buffers and state-dict keys. With `sync_group` set
    (`sync_fused_norm`, as `danet train` does under torchrun) training statistics span its processes."""

    sync_group = None

    def fusable(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if torch.compiler.is_compiling():  # first: dynamo then traces PyTorch's batch norm and nothing below
            return False
        if triton is None or not self.affine or not self.track_running_stats or self.running_mean is None:
            return False
        if not (x.is_cuda or interpreted()) or x.dim() != 4 or x.dtype not in DTYPES or x.numel() == 0:
            return False
        if x.numel() >= 2**31 or _layout(x) is None:
            return False
        if residual is not None and (residual.dtype != x.dtype or residual.stride() != x.stride()):
            return False
        if not self.training and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False  # evaluation with gradients (rare): PyTorch's kernels, which have the backward
        return True

    def forward_act(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
        if x.dim() == 4 and _layout(x) is None:  # a strided view: one copy rather than PyTorch's three passes
            x = x.contiguous()
        if x.dim() == 4 and residual is not None and residual.stride() != x.stride():
            residual = residual.contiguous(memory_format=torch.channels_last if _layout(x) else torch.contiguous_format)
        group = self.sync_group if self.training else None
        if group is not None and not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            group = None
        if not self.fusable(x, residual):
            if group is not None:  # PyTorch's batch norm here would leave this process's statistics its own
                raise DanetError(
                    f"norm=triton cannot run its kernels on this input ({x.dtype}, {tuple(x.shape)} on {x.device}), "
                    "so its statistics would not be synchronised over the processes; use norm=native"
                )
            y = super().forward(x)
            if residual is not None:
                y = y + residual
            return torch.relu_(y) if relu else y
        if not self.training:
            return _eval_apply(self, x, residual, relu)
        if x.numel() // x.shape[1] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        self.num_batches_tracked.add_(1)
        return _FusedBatchNormAct.apply(x, residual, self.weight, self.bias, self, relu, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x, None, relu=False)


def bn_relu(bn: nn.Module, x: torch.Tensor, relu: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(x) [+ residual]): one fused pass with `FusedBatchNorm2d`, the modules one by one otherwise; `x` as it
    is after a convolution that did the norm and the ReLU itself (models/folded.py; with a residual, the folded norm
    is the identity and the modules below add it)."""
    if type(bn) is FusedBatchNorm2d:
        return bn.forward_act(x, residual)
    if residual is None and getattr(bn, "folded", False):
        return x
    y = bn(x)
    if residual is not None:
        y = y + residual
    return relu(y)


def why_unused(device: torch.device, compiled: bool = False) -> str | None:
    """Why `norm="triton"` would leave a run on PyTorch's batch norm (None: its kernels run)."""
    if device.type != "cuda" and not interpreted():
        return "runs on CUDA only"
    if compiled:
        return "has no effect under compile (inductor fuses batch norm itself)"
    return None


def use_fused_norm(model: nn.Module, enabled: bool = True) -> int:
    """Swap the model's `nn.BatchNorm2d` modules for `FusedBatchNorm2d` (or back). Returns how many were swapped."""
    if enabled and triton is None:
        raise DanetError("norm=triton needs the triton package (part of PyTorch's CUDA builds); use norm=native")
    count = 0
    for mod in model.modules():
        if enabled and type(mod) is nn.BatchNorm2d:
            mod.__class__ = FusedBatchNorm2d
            count += 1
        elif not enabled and type(mod) is FusedBatchNorm2d:
            mod.__class__ = nn.BatchNorm2d
            mod.__dict__.pop("_fused_scalars", None)
            mod.__dict__.pop("sync_group", None)
            count += 1
    return count


def sync_fused_norm(model: nn.Module, group=None) -> int:
    """Synchronise the model's `FusedBatchNorm2d` over `group` (default: all processes), in place of converting
    them to `nn.SyncBatchNorm`. Returns how many."""
    mods = [m for m in model.modules() if type(m) is FusedBatchNorm2d]
    for m in mods:
        m.sync_group = group if group is not None else dist.group.WORLD
    return len(mods)


def set_inference_norm(model: nn.Module, norm: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`danet test` / `predict` `--norm`: "triton" swaps the batch norms (with a note where its kernels cannot run);
    "folded" folds them into the convolutions before them (models/folded.py; `dtype`: the run's compute dtype, bf16 /
    fp16 under that autocast, else float32)."""
    if norm == "triton":
        use_fused_norm(model)
        if why := why_unused(next(model.parameters()).device):
            note(f"--norm triton {why}; PyTorch's batch norm runs")
    elif norm == "folded":
        from .folded import fold_batch_norm

        fold_batch_norm(model.eval(), dtype)
    return model
