"""Registers, spills and shared memory of the decode kernels on an H100, compiled on any machine (no GPU needed).

Triton compiles for a named target without a device, and the cuobjdump it ships reads each binary's resources. A
kernel that spills registers to local memory, or takes so many that few programs fit an SM, is slow in a way no CPU
test shows; this prints it for the Llama-3.1-8B shape (head_dim 128, GQA 4) in the configurations decoding and
scoring use, with the number of instructions in each kernel's main loop and the commonest of them (SASS read by the
nvdisasm Triton ships). (Triton's interpreter, which the CPU tests run, never compiles a kernel:
`tests/test_kernel_compile.py` runs this script so that a kernel that would not compile for the GPU fails on the CPU
too.)

Each kernel is compiled as Triton's launcher specialises it at run time: pointers 16-byte aligned (torch's
allocations are; ``DIVISIBLE_EXCEPT`` lists the views that are not) and the integer arguments that are multiples of 16
at this shape marked so (``divisible`` in each row). Without that, Triton can neither vectorise the loads nor stage
them through shared memory (cp.async): an earlier version of this script compiled so and reported 255 registers and
spills for the context split kernel, which the kernel as launched does not have.

    python scripts/kernel_resources.py            # sm_90a (H100 / H200)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvzip_cache.kernels import ragged_attention, restricted_scores, split_tail


# Pointer arguments that are views at an offset (not 16-byte aligned) in the launches: ``cu_seqlens[1:]``.
DIVISIBLE_EXCEPT = {"END"}
# Integer arguments that are multiples of 16 at the Llama-3.1-8B decode shape (one token, GQA 4, 8 KV heads, 33
# context splits, 16 tail splits): the strides over rows of head_dim (128) values, and the log-sum-exp strides over
# batch rows (8 heads x 33 splits x 4 rows = 1056); with 64 shared rows (256 query rows) all of them.
SPLIT_DIVISIBLE = {"stride_qb", "stride_qh", "stride_qm", "stride_ob", "stride_oh", "stride_os", "stride_om",
                   "stride_lb"}
TAIL_DIVISIBLE = {"stride_qb", "stride_qh", "stride_qm", "stride_tb", "stride_th", "stride_tn", "stride_pb",
                  "stride_ph", "stride_ps", "stride_pm", "stride_ob", "stride_oh", "stride_os", "stride_om",
                  "stride_oq", "stride_lb"}
MERGE_DIVISIBLE = {"stride_cb", "stride_ch", "stride_cs", "stride_cm", "stride_clb", "stride_tb", "stride_th",
                   "stride_ts", "stride_tm", "stride_tlb", "stride_tlh", "stride_ob", "stride_oq", "stride_oh"}
SCORES_DIVISIBLE = {"stride_qh", "stride_qn", "stride_kh", "stride_kr"}


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton's signature of ``kernel``: the named pointer types, fp32 ``scaling``, i32 for every other argument."""
    types = {}
    for param in kernel.params:
        if param.is_constexpr or param.name in constexprs:
            types[param.name] = "constexpr"
        else:
            types[param.name] = pointers.get(param.name, "fp32" if param.name == "scaling" else "i32")
    return types


def attributes(kernel, types: dict[str, str], divisible: set[str]) -> dict:
    """Triton's specialisation attributes as its launcher sets them: ``tt.divisibility`` 16 on aligned pointers and
    on the integer arguments in ``divisible``."""
    return {(index,): [["tt.divisibility", 16]] for index, param in enumerate(kernel.params)
            if (types[param.name].startswith("*") and param.name not in DIVISIBLE_EXCEPT) or param.name in divisible}


def main_loop(sass: str) -> collections.Counter:
    """The opcodes of the longest backward branch's body in nvdisasm's listing (the kernel's main loop)."""
    lines = sass.splitlines()
    address = {}  # label -> address of its first instruction
    instructions = []  # (address, opcode, branch target label or None)
    for number, line in enumerate(lines):
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            following = next((ln for ln in lines[number + 1:] if re.search(r"/\*([0-9a-f]{4,})\*/", ln)), "")
            found = re.search(r"/\*([0-9a-f]{4,})\*/", following)
            if found:
                address[label.group(1)] = int(found.group(1), 16)
        found = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if found:
            target = re.search(r"BRA\s+.*?(\.L_x_\d+)", line)
            instructions.append((int(found.group(1), 16), found.group(2), target.group(1) if target else None))
    loops = [(address[target], at) for at, _, target in instructions if target in address and address[target] < at]
    if not loops:
        return collections.Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(opcode for at, opcode, _ in instructions if start <= at <= end)


def resources(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int,
              divisible: set[str] = frozenset()) -> str:
    """ptxas's report (registers, spill stores/loads, shared memory) of one compiled configuration, and its main
    loop's instruction count."""
    types = signature(kernel, pointers, constexprs)
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs,
                                        attrs=attributes(kernel, types, divisible)),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])  # the binary Triton would load, as its own ptxas made it
        report = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                                text=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if usage is None:
        return report.strip()[-300:]
    registers, shared = int(usage.group(1)), compiled.metadata.shared
    loop = main_loop(sass)
    commonest = ", ".join(f"{opcode} {count}" for opcode, count in loop.most_common(4))
    return (f"{registers} registers, stack (spills) {usage.group(2)} B, local {usage.group(3)} B, shared {shared} B; "
            f"main loop {sum(loop.values())} instructions ({commonest}); "
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
    split = {**dims, "BLOCK_M": 16, "BLOCK_N": 128, "IEEE": False, "SCALED": False, "F16_DOTS": False}
    shared = SPLIT_DIVISIBLE | {"stride_lh", "stride_ls", "rows"}
    rows = [("context split, 1 row, bf16", ragged_attention._ragged_split_kernel, bf16, split, 4, 2,
             SPLIT_DIVISIBLE),
            ("context split, 1 row, fp8", ragged_attention._ragged_split_kernel, fp8,
             {**split, "SCALED": True, "F16_DOTS": True}, 4, 2, SPLIT_DIVISIBLE),
            ("context split, 1 row, fp8, bf16 products", ragged_attention._ragged_split_kernel, fp8,
             {**split, "SCALED": True}, 4, 2, SPLIT_DIVISIBLE),
            ("context split, 64 shared rows (block 64)", ragged_attention._ragged_split_kernel, bf16,
             {**split, "BLOCK_M": 64}, 4, 2, shared),
            ("context split, 64 shared rows (block 128)", ragged_attention._ragged_split_kernel, bf16,
             {**split, "BLOCK_M": 128}, 8, 2, shared),
            ("context split, 64 shared rows, fp8 (block 64)", ragged_attention._ragged_split_kernel, fp8,
             {**split, "BLOCK_M": 64, "SCALED": True, "F16_DOTS": True}, 4, 2, shared)]
    tail = {"Q": "*bf16", "TK": "*bf16", "TV": "*bf16", "VALID": "*i8", "END": "*i64", "PO": "*fp32", "PL": "*fp32",
            "OUT": "*bf16", "O": "*fp32", "LSE": "*fp32"}
    flags = {"BLOCK_M": 16, "BLOCK_N": 32, "HAS_VALID": True, "HAS_END": True, "IEEE": False}
    rows += [("tail + merge (two-launch path)", ragged_attention._tail_merge_kernel, tail, {**dims, **flags}, 4, 3,
              TAIL_DIVISIBLE),
             ("tail split (split-tail path)", split_tail._tail_split_kernel, tail, {**dims, **flags}, 4, 3,
              TAIL_DIVISIBLE),
             ("merge (split-tail path)", split_tail._merge_kernel,
              {"CO": "*fp32", "CL": "*fp32", "TO": "*fp32", "TL": "*fp32", "OUT": "*bf16"},
              {**dims, "BLOCK_S": 32}, 4, 3, MERGE_DIVISIBLE)]
    scores = {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "OUT": "*fp32"}
    blocks = {**dims, "BLOCK_M": 64, "BLOCK_N": 64, "IEEE": False}
    rows += [("KVzip scores: log-sum-exp", restricted_scores._lse_kernel, scores, blocks, 4, 3, SCORES_DIVISIBLE),
             ("KVzip scores: max probability", restricted_scores._max_prob_kernel, scores, blocks, 4, 3,
              SCORES_DIVISIBLE)]
    for name, kernel, pointers, constexprs, warps, stages, divisible in rows:  # the launches' warps and stages
        report = resources(kernel, pointers, constexprs, warps, stages, args.arch, divisible)
        print(f"{name:<44} {warps} warps, {stages} stages: {report}", flush=True)


if __name__ == "__main__":
    main()
