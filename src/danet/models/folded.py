"""Batch norm folded into the convolution before it, for inference (`norm="folded"`; `danet benchmark --norm folded`).

In evaluation a batch norm is a per-channel affine map of the convolution's output, so it folds into that
convolution: weight * s and a bias b - mean * s, s = weight_bn / sqrt(running_var + eps). On CUDA the folded
convolution then runs with its bias, the residual add and the ReLU in one cuDNN call (`torch.cudnn_convolution_relu`,
`torch.cudnn_convolution_add_relu`: the convolution's epilogue), so the separate normalise-and-ReLU pass over each
activation disappears. On an H200 that pass took 1.65 ms of a whole 1024x2048 image's 10.2 ms and 0.27 of a 512x512
image's 1.8 (bf16, the fused Triton batch norm, benchmarks/RESULTS.md); the convolutions themselves took 4.6 and 0.8.

The same function; the values change by rounding: the folded weights and bias are rounded once to the compute dtype
(`dtype`: bf16 under bf16 autocast) where the unfolded network rounds the convolution's output and normalises it in
float32. In a ResNet bottleneck the projection shortcut's bias joins the last convolution's, so the shortcut is a
plain convolution. Elsewhere (the CPU, a FLOP count or another dispatch mode, torch.compile; channel counts that are
not multiples of 8, as the image's 3; a layer whose fused call cuDNN refused, with a warning, as having no engine for
its shape) the same folded weights run through `F.conv2d`, + residual, ReLU.

Inference only: `fold_batch_norm` refuses a model in training mode, and a folded model refuses `.train()`. A model
folded in bf16 / fp16 has all its convolutions' weights in that dtype and runs under that autocast; without it, its
first convolution refuses the image in one line.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import DanetError
from .amp import autocast_dtype
from .norm_kernels import interpreted, triton

TRAIN_REFUSED = "this model's batch norms are folded into its convolutions (norm=folded): inference only"
FOLDED_HALF_ALONE = ("this model's batch norms were folded into its convolutions in {dtype}: run it under "
                     "torch.autocast('{device}', dtype=torch.{dtype}) (as danet test --amp does), or fold it in "
                     "float32")  # fmt: skip
WINOGRAD_REFUSED = "--norm folded replaces the convolutions that --conv winograd would switch; give one of them"
INTERPRETER = False  # `bias_relu` also on the CPU through Triton's interpreter where TRITON_INTERPRET=1 (the tests)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def bias_relu_rows(x_ptr, b_ptr, y_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = relu(x + b) over an (M, C) row-major view (a channels-last map: M = N*H*W), in float32 (float64 for
        float64), stored in y's dtype."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < M)[:, None] & cmask[None, :]
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        acc_t = tl.float64 if bias.dtype == tl.float64 else tl.float32
        offs = rows[:, None] * C + cols[None, :]
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t) + bias.to(acc_t)[None, :]
        tl.store(y_ptr + offs, tl.maximum(y, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


def bias_relu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(y + bias per channel) of a channels-last `y` (N, C, H, W) in one Triton pass, into y itself."""
    n, c, h, w = y.shape
    block_c = min(64, triton.next_power_of_2(c))
    block_m = max(16, 4096 // block_c)
    grid = (triton.cdiv(n * h * w, block_m), triton.cdiv(c, block_c))
    bias_relu_rows[grid](y, bias, y, n * h * w, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return y


class FoldedNorm(nn.BatchNorm2d):
    """A batch norm whose work the convolution before it does (same parameters and buffers, unused): the identity."""

    folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def train(self, mode: bool = True):
        if mode:
            raise DanetError(TRAIN_REFUSED)
        return super().train(False)


class FoldedConv2d(nn.Conv2d):
    """A convolution with its batch norm folded in (`bias` holds the shift); `act`: ReLU after the optional residual."""

    act = False
    unfused: str | None = None  # why cuDNN refused this layer's fused call (it then runs F.conv2d + bias, add, ReLU)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w, b = self.weight, self.bias
        if x.dtype != w.dtype:  # the image into the first convolution; later layers give w's dtype already
            if w.dtype in (torch.float16, torch.bfloat16) and autocast_dtype(x.device.type) is None:
                raise DanetError(FOLDED_HALF_ALONE.format(dtype=str(w.dtype)[6:], device=x.device.type))
            x = x.to(w.dtype)
        if residual is not None and residual.dtype != w.dtype:
            residual = residual.to(w.dtype)
        # NOTE: cuDNN's fused calls only where every channel count is a multiple of 8 (16-byte rows in channels last:
        # the image's 3 channels go through F.conv2d, for which cuDNN keeps engines for any count)
        if self.act and self.unfused is None and self.in_channels % 8 == 0 and self.out_channels % 8 == 0 \
                and _cudnn_fuses(x):  # fmt: skip
            args = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
            try:
                if residual is not None:
                    return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *args)
                return torch.cudnn_convolution_relu(x, w, b, *args)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # NOTE: no engine for this shape (found at the first, eager call: a CUDA
                if x.is_cuda and torch.cuda.is_current_stream_capturing():  # graph is captured after warm-ups)
                    raise
                self.unfused = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"cuDNN refused a fused convolution ({self.unfused}); that layer runs unfused", stacklevel=2
                )
        # bias and ReLU in one Triton pass where it runs (the image's 3-channel convolution on CUDA: PyTorch's bias
        # add and ReLU took 22 + 15 us of a whole 1024x2048 image on an H200)
        apart = self.act and residual is None and b is not None and _bias_relu_runs(x)
        with torch.autocast(x.device.type, enabled=False):  # NOTE: w's dtype is the compute dtype already
            y = F.conv2d(x, w, None if apart else b, self.stride, self.padding, self.dilation, self.groups)
        if apart:
            if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
                return bias_relu(y, b)
            y = y.add_(b.view(1, -1, 1, 1))
        if residual is not None:
            y = y + residual
        return torch.relu_(y) if self.act else y


def _bias_relu_runs(x: torch.Tensor) -> bool:
    """Whether `bias_relu` runs here: Triton, on CUDA (where cuDNN's fused call would: not compiled or traced) or
    through its CPU interpreter (INTERPRETER)."""
    return triton is not None and (_cudnn_fuses(x) if x.is_cuda else INTERPRETER and interpreted())


def _cudnn_fuses(x: torch.Tensor) -> bool:
    if not x.is_cuda or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return _get_current_dispatch_mode() is None  # NOTE: a FlopCounterMode counts F.conv2d, not cuDNN's fused ops


def _fold(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, act: bool, dtype: torch.dtype, bias: bool = True):
    """Fold `bn` into `conv` (in float64, then rounded once to `dtype`), in place; `bn` becomes the identity.
    Returns the folded shift (float64) where `bias` is False (the caller puts it elsewhere)."""
    if bn.running_mean is None or bn.running_var is None:
        raise DanetError("norm=folded needs batch norms with running statistics")
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.affine else 0.0)
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        w = conv.weight
        folded = (w.double() * scale.view(-1, 1, 1, 1)).to(dtype)  # NOTE: keeps w's memory format
        conv.weight = nn.Parameter(folded, requires_grad=False)
        conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False) if bias else None
    conv.__class__ = FoldedConv2d
    conv.act = act
    bn.__class__ = FoldedNorm
    return None if bias else shift


def fold_batch_norm(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Fold every batch norm of `model` (an eval-mode DANet) into the convolution before it; returns how many.
    `dtype`: the folded convolutions' weights, the compute dtype: a model folded in bf16 / fp16 (its other
    convolutions' weights cast to it as well, as autocast would at each forward) runs under that autocast, one folded
    in float32 without."""
    from .heads import ConvBNReLU
    from .resnet import Bottleneck, ResNet, Stem

    if model.training:
        raise DanetError("norm=folded folds the running statistics: put the model in eval mode (inference only)")
    if any(isinstance(m, (FoldedConv2d, FoldedNorm)) for m in model.modules()):
        raise DanetError("this model's batch norms are folded already (norm=folded): fold a model once")
    count = 0
    for mod in list(model.modules()):
        if isinstance(mod, Stem):
            for i in range(0, len(mod), 3):
                _fold(mod[i], mod[i + 1], True, dtype)
                count += 1
        elif isinstance(mod, ResNet) and mod.stem_type == "single":
            _fold(mod.conv1, mod.bn1, True, dtype)
            count += 1
        elif isinstance(mod, Bottleneck):
            _fold(mod.conv1, mod.bn1, True, dtype)
            _fold(mod.conv2, mod.bn2, True, dtype)
            shift = _fold(mod.conv3, mod.bn3, True, dtype, bias=False)
            count += 3
            if mod.downsample is not None:  # the shortcut's shift joins conv3's bias: one bias, one fused call
                shift = shift + _fold(mod.downsample[0], mod.downsample[1], False, dtype, bias=False)
                count += 1
            mod.conv3.bias = nn.Parameter(shift.to(dtype), requires_grad=False)
        elif isinstance(mod, ConvBNReLU):
            _fold(mod.conv, mod.bn, True, dtype)
            count += 1
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, FoldedNorm)]  # fmt: skip
    if left:
        raise DanetError(f"norm=folded: no convolution to fold {left[0]} into")
    if dtype in (torch.float16, torch.bfloat16):
        # the other convolutions' weights (the attention's projections, the classifiers) in the compute dtype too:
        # autocast would round them to it at every forward, a kernel each (the cast cache is off in a CUDA graph)
        with torch.no_grad():
            for mod in model.modules():
                if type(mod) is nn.Conv2d:
                    mod.weight = nn.Parameter(mod.weight.to(dtype), requires_grad=False)
                    if mod.bias is not None:
                        mod.bias = nn.Parameter(mod.bias.to(dtype), requires_grad=False)
    return count
