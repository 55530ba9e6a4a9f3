"""Compile the MBA Triton kernels for a CUDA architecture without a GPU: Triton's compiler and
ptxas check the types and lowering that the interpreter lets through, and report registers and
spills per kernel.

    python -m embedding.mba_compile 90      # sm_90; run without TRITON_INTERPRET
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

from embedding.mba_triton import (
    CARRY_BLOCK,
    _carry_kernel,
    _occurrences_kernel,
    _update_kernel,
    chunk_size,
    triton,
    update_warps,
)


def build(kernel, args: dict[str, str], consts: dict, arch: int = 90, num_warps: int = 4) -> str:
    """Compile one Triton kernel for CUDA sm_<arch> without a GPU (Triton's compiler, then ptxas);
    its line: the constants, the warps, ptxas's registers and spills."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature = {**args, **dict.fromkeys(consts, "constexpr")}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=consts),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (
        f"{kernel.__name__} {consts} num_warps={num_warps}: {regs.group(1) if regs else '?'} registers, "
        f"{spills.group(1) if spills else '?'} bytes spilled"
    )


def compile_kernels(arch: int = 90) -> list[str]:
    """Compile the Triton kernels as the wrappers launch them (dims 16, 64, 128; one table and
    three; SGD, row-wise Adagrad, Adam and partial row-wise Adam; static and online counts; fp32
    and bf16 weights) for CUDA sm_<arch>, without a GPU: Triton's compiler and ptxas check the
    types and lowering that the interpreter lets through. Run without TRITON_INTERPRET. One line
    per kernel compiled, with ptxas's register and spill report (`python -m embedding.mba_compile 90` prints them)."""
    done = []

    def build_one(kernel, args: dict[str, str], consts: dict, num_warps: int = 4) -> None:
        done.append(build(kernel, args, consts, arch, num_warps))

    i64, i32, f32 = "*i64", "*i32", "*fp32"
    for pooled, linearize, samples in [
        (True, False, False),
        (True, True, True),
        (False, True, True),
        (False, False, False),
    ]:
        build_one(
            _occurrences_kernel,
            dict(
                indices_ptr=i64,
                offsets_ptr=i64,
                ftm_ptr=i64,
                row_off_ptr=i64,
                col_ptr=i64,
                lin_ptr=i64,
                src_ptr=i64,
                sample_ptr=i64,
                n="i32",
                n_bags="i32",
                batch="i32",
                stride="i32",
                steps="i32",
            ),
            dict(POOLED=pooled, LINEARIZE=linearize, SAMPLES=samples, BLOCK=1024),
        )
    for dim in (16, 64, 128):
        block_d = max(16, triton.next_power_of_2(dim))
        c = chunk_size(block_d)
        for (n_tables, block_t), online, mode, weight in [
            ((1, 1), False, 0, "*fp32"),  # SGD
            ((3, 2), True, 1, "*fp32"),  # row-wise Adagrad
            ((1, 1), True, 0, "*bf16"),
            ((1, 1), True, 2, "*fp32"),  # Adam
            ((3, 2), False, 3, "*bf16"),  # partial row-wise Adam
        ]:
            # keys: int32 below 2^31 (int64 here for a large online key); static counts: DIV = 1,
            # which Triton specializes as a constant
            keys, new, div = (("*i64" if mode == 1 else i32), i32, {}) if online else (i32, f32, {"DIV": 1})
            div_arg = {} if div else {"DIV": "i32"}
            build_one(
                _carry_kernel,
                dict(
                    sums_ptr=f32,
                    new_ptr=new,
                    keys_ptr=keys,
                    perm_ptr=i64,
                    src_ptr=i64,
                    grad_ptr=f32,
                    row_off_ptr=i64,
                    dims_ptr=i64,
                    n="i32",
                    **div_arg,
                ),
                dict(T=n_tables, BLOCK_T=block_t, C=c, BLOCK_D=block_d, ONLINE=online, **div),
            )
            build_one(
                _update_kernel,
                dict(
                    weight_ptr=weight,
                    momentum_ptr=f32 if mode in (1, 3) else i32,
                    exp_avg_ptr=f32 if mode in (2, 3) else i32,
                    exp_avg_sq_ptr=f32 if mode == 2 else i32,
                    counts_ptr=i32,
                    keys_ptr=keys,
                    perm_ptr=i64,
                    src_ptr=i64,
                    grad_ptr=f32,
                    sums_ptr=f32,
                    new_ptr=new,
                    row_off_ptr=i64,
                    w_off_ptr=i64,
                    m_off_ptr=i64,
                    dims_ptr=i64,
                    n="i32",
                    **div_arg,
                    lr="fp32",
                    lam="fp32",
                    eps="fp32",
                    beta1="fp32",
                    beta2="fp32",
                    bias1="fp32",
                    bias2="fp32",
                ),
                dict(
                    T=n_tables,
                    BLOCK_T=block_t,
                    C=c,
                    CB=CARRY_BLOCK,
                    BLOCK_D=block_d,
                    MODE=mode,
                    ONLINE=online,
                    **div,
                ),
                num_warps=update_warps(c, block_d),
            )
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding.mba_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", type=int, help="CUDA compute capability without the dot, e.g. 90 for sm_90")
    args = parser.parse_args(argv)
    print("\n".join(compile_kernels(args.arch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
