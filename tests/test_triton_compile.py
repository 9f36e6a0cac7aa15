"""Every Triton kernel of the project compiles for an H100 / H200 (sm_90), here, without a GPU.

The other Triton tests run the kernels through the interpreter, which accepts some programs the GPU compiler rejects
(and the reverse). `compile_kernels_sm90.py` runs Triton's real compiler (to a cubin, with ptxas) on every variant the
code launches, in a subprocess without TRITON_INTERPRET, with its arguments marked as Triton marks them at launch;
the half-precision NHWC batch-norm kernels must move activations in 128-bit accesses only, and no kernel may spill
registers. Checked by hand with triton 3.6.0 too, the GPU image's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton (CPU-only platform)")


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, nothing written to the home directory
    script = Path(__file__).with_name("compile_kernels_sm90.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stderr[-2000:]
    result = json.loads(lines[-1])
    assert result["failed"] == [] and run.returncode == 0
    assert result["scalar_access"] == []  # bf16 / fp16 NHWC batch norm: 128-bit loads and stores only
    assert result["spills"] == []  # no kernel spills registers to local memory
    # 80 batch-norm variants (4 dtypes x 2 layouts x flags), 5 of the loss, 3 of the attention (bf16, fp16, any N)
    # and the 6 attention variants (exp2, lazy rescaling, the fused residual); the stem's max pooling in bf16 and fp16;
    # the logits' resize (4) and the folded convolutions' bias + ReLU pass (2)
    assert result["compiled"] == 102
