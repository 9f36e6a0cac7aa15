"""CPU A/B of the attention modules' channels-last forms (2026-11-27): the channel attention's residual in its
product (`baddbmm`, `attention.GEMM_RESIDUAL`: the current code) against it written in x's layout with both residuals
as one `addcmul` (the code before that) and against the forms before those (an NCHW product beside a channels-last x;
`gamma * out + x`), swapped into the same R50-D8 model (Winograd, channels last: the CPU's fastest float32 inference)
and timed in interleaved rounds.

    .venv/bin/python benchmarks/cpu_attention_layout_ab.py [--rounds 4] [--size 256] [--batch 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import danet
from danet.models import attention as A
from danet.models.winograd import use_winograd


def cam_before(self, x: torch.Tensor) -> torch.Tensor:
    """The channel attention's forward before 2026-11-27 (its output NCHW whatever x's layout)."""
    b, c, h, w = x.shape
    q = x.reshape(b, c, h * w)
    return self.gamma * torch.bmm(self._attention(q), q).reshape(b, c, h, w) + x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    forms = {"now": (A.ChannelAttention.forward, A.residual, True),
             "addcmul": (A.ChannelAttention.forward, A.residual, False),
             "before": (cam_before, lambda x, g, out: g * out + x, False)}  # fmt: skip
    model = danet.create_model("danet_r50-d8_ade20k").eval()
    use_winograd(model, True)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in forms}
    with torch.inference_mode():
        model(x)  # warm-up (the Winograd weights' cache)
        for r in range(a.rounds):
            for name in list(forms) if r % 2 == 0 else list(forms)[::-1]:  # (interleaved, alternating order)
                A.ChannelAttention.forward, A.residual, A.GEMM_RESIDUAL = forms[name]
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    A.ChannelAttention.forward, A.residual, A.GEMM_RESIDUAL = forms["now"]
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.3f} s/batch ({', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
