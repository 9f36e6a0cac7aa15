"""Compile this project's Triton kernels for an H100 / H200 (sm_90) without a GPU; run by tests/test_triton_compile.py.

Triton's compiler (front end, MLIR passes, ptxas) runs on any Linux machine, so a kernel that the interpreter runs
but the GPU compiler rejects fails here, not on the GPU. Every variant the code launches: the fused batch norm's
kernels for each dtype, layout and flag combination, and the Triton loss for the crops' scales. The arguments are
marked as Triton's launcher marks them for the real shapes (pointers 16-byte aligned; the batch norm's C, M = N*H*W
and H*W multiples of 16), so the code is what an H100 would run: for the bf16 / fp16 NHWC batch norm every global
load and store of activations must be vectorised (128-bit), which is what makes these kernels bandwidth-bound; and
no kernel that a GPU run uses may spill registers to local memory (ptxas -v on its PTX: the Triton loss spilled 796
bytes a thread when its row loop was unrolled; the float64 variants, for exactness checks only, may). Prints one
JSON line: {"triton": version, "compiled": n, "failed": [...], "scalar_access": [...], "spills": [...]}. Must run
without TRITON_INTERPRET (compiled mode).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiled mode only"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import danet.engine.triton_loss as TL  # noqa: E402
import danet.models.folded as FO  # noqa: E402
import danet.models.fused_norm as FN  # noqa: E402
import danet.models.triton_attention as TA  # noqa: E402
import danet.models.triton_pool as TP  # noqa: E402
import danet.models.triton_resize as TR  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}


def acc_of(dt: str) -> str:
    return "*fp64" if dt == "fp64" else "*fp32"


def cases():
    """(name, kernel, signature {arg: type}, constexprs {arg: value})."""
    i32 = "i32"
    for dt, cl in product(("bf16", "fp16", "fp32", "fp64"), (True, False)):
        x, a = PTR[dt], acc_of(dt)
        blocks = {"BLOCK_M": 64, "BLOCK_C": 64}
        yield (f"partial_stats/{dt}/cl={cl}", FN.bn_partial_stats,
               dict(x_ptr=x, mean_ptr=a, m2_ptr=a, M=i32, C=i32, HW=i32, iters=i32),
               dict(CL=cl, **blocks))  # fmt: skip
        flag_sets = [(True, True, False), (False, True, False), (False, False, False), (True, True, True),
                     (False, True, True)] if cl else [(False, True, False), (True, True, True)]  # fmt: skip
        for has_res, relu, from_var in flag_sets:
            yield (f"apply/{dt}/cl={cl}/res={has_res}/relu={relu}/from_var={from_var}", FN.bn_apply,
                   dict(x_ptr=x, r_ptr=x, y_ptr=x, mean_ptr="*fp32" if from_var and dt != "fp64" else a,
                        stat_ptr="*fp32" if from_var and dt != "fp64" else a, w_ptr="*fp32" if dt != "fp64" else a,
                        b_ptr="*fp32" if dt != "fp64" else a, scalars_ptr=a, M=i32, C=i32, HW=i32),
                   dict(CL=cl, HAS_RES=has_res, RELU=relu, FROM_VAR=from_var, **blocks))  # fmt: skip
        w = "*fp32" if dt != "fp64" else a
        for relu, from_y, write_dz in [(True, False, False), (True, True, True), (False, False, False)]:
            yield (f"backward_reduce/{dt}/cl={cl}/relu={relu}/from_y={from_y}", FN.bn_backward_reduce,
                   dict(dy_ptr=x, x_ptr=x, y_ptr=x, dz_ptr=x, mean_ptr=a, invstd_ptr=a, w_ptr=w, b_ptr=w, sums_ptr=a,
                        M=i32, C=i32, HW=i32, P=i32, iters=i32),
                   dict(CL=cl, RELU=relu, MASK_FROM_Y=from_y, WRITE_DZ=write_dz, **blocks))  # fmt: skip
        for relu in (True, False):
            yield (f"backward_apply/{dt}/cl={cl}/relu={relu}", FN.bn_backward_apply,
                   dict(dy_ptr=x, x_ptr=x, y_ptr=x, dx_ptr=x, mean_ptr=a, invstd_ptr=a, w_ptr=w, b_ptr=w,
                        sums_ptr=a, count=i32, M=i32, C=i32, HW=i32),
                   dict(CL=cl, RELU=relu, MASK_FROM_Y=False, **blocks))  # fmt: skip
    for acc, local in product(("*fp32", "*fp64"), (False, True)):
        yield (f"combine_stats/{acc}/local={local}", FN.bn_combine_stats,
               dict(mean_p=acc, m2_p=acc, scalars_ptr=acc, mean_ptr=acc, invstd_ptr=acc, rmean_ptr=acc, rvar_ptr=acc,
                    P=i32, M=i32, C=i32, rows_per_program=i32),
               dict(LOCAL=local, BLOCK_P=64, BLOCK_C=64))  # fmt: skip
    for s, k in ((8, 150), (8, 19), (8, 21), (16, 150), (16, 19)):  # output stride 8 and 16 presets: ADE, City, VOC
        yield (f"triton_loss/S={s}/K={k}", TL.upsampled_ce_tiles,
               dict(z_ptr="*fp32", t_ptr="*i64", loss_ptr="*fp32", g_ptr="*fp32", h=i32, w=i32, H=i32, W=i32, K=i32,
                    ignore=i32),
               dict(S=s, BLOCK_S=triton.next_power_of_2(s), BLOCK_K=triton.next_power_of_2(k)))  # fmt: skip
    # the position attention's kernel as DANet launches it: q / k 64 wide, v 512; positions N a multiple of 16 or not;
    # then the variants benchmarks/gpu_suite.py times (exp2, lazy rescaling, the fused residual; all 512 channels a
    # program)
    strides = ("s_qb", "s_qn", "s_kb", "s_kn", "s_vb", "s_vn", "s_ob", "s_on", "s_xb", "s_xn")
    model = dict(TA.blocks(64, 512), num_warps=TA.NUM_WARPS, EXP2=False, LAZY=False, RESIDUAL=False)
    for dt, n_any, name, extra in (("bf16", False, "", {}), ("fp16", False, "", {}), ("bf16", True, "", {}),
                                   ("bf16", False, "/exp2", dict(EXP2=True)), ("bf16", False, "/lazy", dict(LAZY=True)),
                                   ("bf16", False, "/exp2_residual", dict(EXP2=True, RESIDUAL=True)),
                                   ("fp16", True, "/residual", dict(RESIDUAL=True)),
                                   ("fp16", False, "/lazy_exp2", dict(EXP2=True, LAZY=True)),
                                   ("bf16", False, "/m64_c512_lazy_exp2",
                                    dict(BLOCK_M=64, BLOCK_C=512, EXP2=True, LAZY=True))):  # fmt: skip
        yield (f"pam_forward/{dt}" + ("/N-any" if n_any else "") + name, TA.pam_forward,
               dict(q_ptr=PTR[dt], k_ptr=PTR[dt], v_ptr=PTR[dt], o_ptr=PTR[dt], x_ptr=PTR[dt], g_ptr="*fp32", N=i32,
                    D=i32, C=i32, **dict.fromkeys(strides, i32)),
               dict(model, F64=False, UPCAST=False) | extra)  # fmt: skip


def pool_cases():
    """The stem's max pooling (3x3, stride 2, padding 1) as ResNet runs it, channels last: C, W * C, H * W * C
    multiples of 16, so that every access can be 128 bits."""
    i32 = "i32"
    for dt in ("bf16", "fp16"):
        yield (f"max_pool/{dt}/cl=True", TP.max_pool_nhwc,
               dict(x_ptr=PTR[dt], y_ptr=PTR[dt], H=i32, W=i32, OH=i32, OW=i32, C=i32, s_xb=i32, s_xh=i32, s_xw=i32,
                    s_yb=i32, s_yh=i32, s_yw=i32),
               dict(K=3, S=2, P=1, F64=False, BLOCK_P=TP.BLOCK_P, BLOCK_C=TP.BLOCK_C))  # fmt: skip


def resize_and_epilogue_cases():
    """The logits' bilinear resize (NCHW out, any input strides; both align_corners) and the folded convolution's
    bias + ReLU pass over a channels-last map (C and M = N*H*W multiples of 16: 128-bit access)."""
    i32 = "i32"
    for dt, align in (("bf16", False), ("fp16", False), ("bf16", True), ("fp32", False)):
        yield (f"resize_bilinear/{dt}" + ("/align" if align else ""), TR.bilinear_nchw_out,
               dict(x_ptr=PTR[dt], y_ptr=PTR[dt], K=i32, H=i32, W=i32, OH=i32, OW=i32, s_xb=i32, s_xk=i32, s_xh=i32,
                    s_xw=i32),
               dict(ALIGN=align, F64=False, BLOCK=TR.BLOCK))  # fmt: skip
    for dt in ("bf16", "fp16"):
        yield (
            f"bias_relu/{dt}/cl=True",
            FO.bias_relu_rows,
            dict(x_ptr=PTR[dt], b_ptr=PTR[dt], y_ptr=PTR[dt], M=i32, C=i32),
            dict(BLOCK_M=64, BLOCK_C=64),
        )


def ptxas_info(ptx: str) -> tuple[int, int]:
    """(registers, bytes of spill stores) a thread, from ptxas -v on the PTX (the same ptxas Triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "-o", str(Path(tmp, "k.cubin")), str(src)],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", log)
    return int(regs.group(1)) if regs else -1, sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def main() -> int:
    done, failed, scalar, spills = 0, [], [], []
    for name, kernel, sig, consts in [*cases(), *pool_cases(), *resize_and_epilogue_cases()]:
        # NOTE: Triton's default 4 warps, as the code launches every kernel but the attention's (num_warps)
        options = {"num_warps": consts.pop("num_warps")} if "num_warps" in consts else {}
        signature = {**sig, **dict.fromkeys(consts, "constexpr")}
        multiples = ("C", "M", "HW") if kernel is not TL.upsampled_ce_tiles else ()
        if kernel is TA.pam_forward:  # every size and stride a multiple of 16 (64 and 512 wide), N too unless N-any
            multiples = tuple(n for n, t in sig.items() if t == "i32" and not (n == "N" and "N-any" in name))
        if kernel is TP.max_pool_nhwc:
            multiples = ("C", "s_xb", "s_xh", "s_xw", "s_yb", "s_yh", "s_yw")
        if kernel is FO.bias_relu_rows:
            multiples = ("M", "C")
        if kernel is TR.bilinear_nchw_out:  # 1024x2048 out: OW and OH * OW multiples of 16; x channels last
            multiples = ("OH", "OW", "H", "W", "s_xb", "s_xh", "s_xw")
        aligned = [n for n, t in sig.items() if t.startswith("*") or n in multiples]
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        try:
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs=consts, attrs=attrs), target=TARGET, options=options
            )
            assert "cubin" in compiled.asm
            done += 1
        except Exception as e:  # noqa: BLE001  (every failure reported, not just the first)
            failed.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}")
            continue
        half_nhwc = name.split("/")[1] in ("bf16", "fp16") and "cl=True" in name
        if half_nhwc and re.search(r"(ld|st)\.global\.b16", compiled.asm["ptx"]):  # one 2-byte element at a time
            scalar.append(name)
        regs, spilled = ptxas_info(compiled.asm["ptx"])
        if "fp64" not in name and spilled > 0:
            spills.append(f"{name}: {spilled} bytes")
        if "--table" in sys.argv:  # a markdown row: warps, registers, spills, shared memory, global access widths
            widths = ", ".join(sorted(set(re.findall(r"(?:ld|st)\.global\.(v\d\.b\d+|b\d+)", compiled.asm["ptx"]))))
            meta = compiled.metadata
            print(f"| {name} | {meta.num_warps} | {regs} | {spilled} | {meta.shared} | {widths} |", file=sys.stderr)
    out = {"triton": triton.__version__, "compiled": done, "failed": failed, "scalar_access": scalar, "spills": spills}
    print(json.dumps(out))
    return 1 if failed or scalar or spills else 0


if __name__ == "__main__":
    sys.exit(main())
