"""Registers, spills and shared memory of the decode kernels on an H100, compiled on any machine (no GPU needed).

Triton compiles for a named target without a device, and the cuobjdump it ships reads each binary's resources. A
kernel that spills registers to local memory, or takes so many that few programs fit an SM, is slow in a way no CPU
test shows; this prints it for the Llama-3.1-8B shape (head_dim 128, GQA 4) in the configurations decoding and
scoring use. (Triton's interpreter, which the CPU tests run, never compiles a kernel: `tests/test_kernel_compile.py`
runs this script so that a kernel that would not compile for the GPU fails on the CPU too.)

    python scripts/kernel_resources.py            # sm_90a (H100 / H200)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvzip_cache.kernels import ragged_attention, restricted_scores, split_tail


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton's signature of ``kernel``: the named pointer types, fp32 ``scaling``, i32 for every other argument."""
    types = {}
    for param in kernel.params:
        if param.is_constexpr or param.name in constexprs:
            types[param.name] = "constexpr"
        else:
            types[param.name] = pointers.get(param.name, "fp32" if param.name == "scaling" else "i32")
    return types


def resources(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int) -> str:
    """ptxas's report (registers, spill stores/loads, shared memory) of one compiled configuration."""
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs),
                                        constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])  # the binary Triton would load, as its own ptxas made it
        report = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if usage is None:
        return report.strip()[-300:]
    registers, shared = int(usage.group(1)), compiled.metadata.shared
    return (f"{registers} registers, stack (spills) {usage.group(2)} B, local {usage.group(3)} B, shared {shared} B; "
            f"programs of {num_warps} warps per SM: {programs_per_sm(registers, shared, num_warps)}")


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """How many programs of a kernel one Hopper SM holds at once: 64K registers (allocated per warp in steps of 8 a
    thread), 228 KB of shared memory, 64 warps."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * num_warps)
    by_shared = 228 * 1024 // shared if shared else 64
    return min(by_registers, by_shared, 64 // num_warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    dims = {"HEAD_DIM": 128, "BLOCK_D": 128}
    bf16 = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KS": "*bf16", "VS": "*bf16", "CU": "*i32", "END": "*i32",
            "SRC": "*i32", "O": "*fp32", "LSE": "*fp32"}
    fp8 = {**bf16, "K": "*fp8e4nv", "V": "*fp8e4nv", "KS": "*fp32", "VS": "*fp32"}
    rows = [("context split, 1 row, bf16", ragged_attention._ragged_split_kernel, bf16,
             {**dims, "BLOCK_M": 16, "BLOCK_N": 128, "IEEE": False, "SCALED": False}, 4, 2),
            ("context split, 1 row, fp8", ragged_attention._ragged_split_kernel, fp8,
             {**dims, "BLOCK_M": 16, "BLOCK_N": 128, "IEEE": False, "SCALED": True}, 4, 2),
            ("context split, 64 shared rows (block 64)", ragged_attention._ragged_split_kernel, bf16,
             {**dims, "BLOCK_M": 64, "BLOCK_N": 128, "IEEE": False, "SCALED": False}, 4, 2),
            ("context split, 64 shared rows (block 128)", ragged_attention._ragged_split_kernel, bf16,
             {**dims, "BLOCK_M": 128, "BLOCK_N": 128, "IEEE": False, "SCALED": False}, 8, 2)]
    tail = {"Q": "*bf16", "TK": "*bf16", "TV": "*bf16", "VALID": "*i8", "END": "*i64", "PO": "*fp32", "PL": "*fp32",
            "OUT": "*bf16", "O": "*fp32", "LSE": "*fp32"}
    flags = {"BLOCK_M": 16, "BLOCK_N": 32, "HAS_VALID": True, "HAS_END": True, "IEEE": False}
    rows += [("tail + merge (two-launch path)", ragged_attention._tail_merge_kernel, tail, {**dims, **flags}, 4, 3),
             ("tail split (split-tail path)", split_tail._tail_split_kernel, tail, {**dims, **flags}, 4, 3),
             ("merge (split-tail path)", split_tail._merge_kernel,
              {"CO": "*fp32", "CL": "*fp32", "TO": "*fp32", "TL": "*fp32", "OUT": "*bf16"},
              {**dims, "BLOCK_S": 32}, 4, 3)]
    scores = {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "OUT": "*fp32"}
    blocks = {**dims, "BLOCK_M": 64, "BLOCK_N": 64, "IEEE": False}
    rows += [("KVzip scores: log-sum-exp", restricted_scores._lse_kernel, scores, blocks, 4, 3),
             ("KVzip scores: max probability", restricted_scores._max_prob_kernel, scores, blocks, 4, 3)]
    for name, kernel, pointers, constexprs, warps, stages in rows:  # the warps and stages the launches use
        report = resources(kernel, pointers, constexprs, warps, stages, args.arch)
        print(f"{name:<44} {warps} warps, {stages} stages: {report}", flush=True)


if __name__ == "__main__":
    main()
