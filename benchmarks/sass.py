"""Offline instruction census of the Pallas and CUDA GPU kernels, on a machine without a GPU.

Lowers ``qdot`` for CUDA (``jax.export`` with ``platforms=["cuda"]``), takes the Triton IR of each
Pallas kernel as JAX emits it, compiles it for sm_90 with the ``triton`` package (its compiler and
the ptxas it ships) and prints, per kernel: registers, shared memory, and the instructions of its
innermost loop per weight, with the commonest opcodes. Device time is scarce; the instruction mix
of a kernel is not, and it answers "does this change remove work?" before a GPU run.

    pip install triton==3.6.0      # the dev extra has it
    python benchmarks/sass.py --formats Q4_0,Q4_K --m 1,16 --shape 4096x14336 [--keep DIR]
    python benchmarks/sass.py --cuda "gemv_kernel<.*Q4K|batch_kernel"    # the CUDA library's loops

``--cuda`` builds ``pallas_kernels``' CUDA library with this machine's nvcc and prints, for each
kernel whose (demangled) name matches, the order of its main loop's global loads (L) and dot
products (D: IDP / IMMA / HMMA), and the register moves that read a register a load of the same
loop wrote: each waits for that load, so a load followed by such a move is not a prefetch (nor is a
load that ptxas sank to the loop's end, right before the branch back to its use).

Uses JAX internals (the Pallas Triton lowering entry point); a development tool, not a test.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from jaxquant import ops

INSTR = re.compile(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


@contextlib.contextmanager
def captured_triton_ir():
    """Collect ``(ir, num_warps, num_stages)`` of every Pallas Triton kernel lowered inside."""
    import inspect

    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration as reg

    found, orig = [], lowering.lower_jaxpr_to_triton_module

    def spy(jaxpr, grid_mapping, *args, **kwargs):
        result = orig(jaxpr, grid_mapping, *args, **kwargs)
        caller = inspect.currentframe().f_back.f_locals  # pallas_call_lowering: its compile parameters
        found.append((result.module.operation.get_asm(enable_debug_info=False), caller["num_warps"],
                      caller["num_stages"]))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield found
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig


def lower_for_cuda(fn, *args) -> list[tuple[str, int, int]]:
    """Triton IR of the Pallas kernels in ``fn(*args)`` lowered for CUDA on this (CPU) host."""
    with captured_triton_ir() as found:
        try:
            jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        except ValueError:  # export refuses the kernel custom call once lowered; the IR is captured
            if not found:
                raise
    return found


def compile_sm90(ttir: str, num_warps: int, num_stages: int, workdir: str) -> tuple[str, str, str]:
    """(SASS, resource usage line, TTGIR: the IR with Triton's register layouts) of Triton IR
    compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    return sass, " ".join(line.strip() for line in res.splitlines() if "REG" in line), k.asm["ttgir"]


def loop_body(sass: str) -> list[tuple[int, str, str, str]]:
    """(address, opcode, its modifiers, operands) of the longest backward-branch loop (the K loop),
    or of the whole kernel."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3) or "", m.group(4))
           for m in map(INSTR.match, sass.splitlines()) if m]
    at = {a: i for i, (a, *_) in enumerate(ins)}
    best: list = []
    for i, (a, op, _, arg) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", arg) if op == "BRA" else None
        if t and int(t.group(1), 16) <= a and int(t.group(1), 16) in at:
            body = ins[at[int(t.group(1), 16)]:i + 1]
            best = body if len(body) > len(best) else best
    return best or ins


def innermost_loop(sass: str) -> collections.Counter:
    return collections.Counter(op for _, op, _, _ in loop_body(sass))


def load_order(body: list[tuple[int, str, str, str]]) -> tuple[str, int]:
    """The loop's streamed weight loads (W: no L1 allocation), other global loads (L) and dot
    products (D) in order, runs counted ("L2 D56 W4"), and its register moves of a register loaded
    in the loop."""
    runs: list[list] = []
    loaded: set[str] = set()
    moves = 0
    for _, op, mods, arg in body:
        regs = re.findall(r"\bR\d+\b", arg)
        if op == "MOV" or (op == "IMAD" and mods.startswith(".MOV")):
            moves += any(r in loaded for r in regs[1:])
        kind = ("W" if ".NA" in mods else "L") if op == "LDG" else "D" if op in ("IDP", "IMMA", "HMMA") else None
        if op == "LDG" and regs:
            loaded.add(regs[0])
        if kind and runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        elif kind:
            runs.append([kind, 1])
    return " ".join(f"{k}{c}" for k, c in runs), moves


def cuda_census(pattern: str) -> None:
    """``--cuda``: each matching CUDA kernel's main loop (see the module's docstring)."""
    import shutil
    from pathlib import Path

    import triton

    from pallas_kernels import cuda_lib

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        lib = cuda_lib.build("90", Path(tmp))
        sass = subprocess.run([tool, "-sass", str(lib)], capture_output=True, text=True, check=True).stdout
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        mangled, _, text = part.partition("\n")
        name = mangled.strip()
        if shutil.which("c++filt"):
            name = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
            name = name.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
        if not re.search(pattern, name):
            continue
        body = loop_body(text)
        order, moves = load_order(body)
        print(f"{name}: loop {len(body)} instructions; {order}; {moves} moves of loaded registers")


def main() -> None:
    import pallas_kernels as pk
    from pallas_kernels.testing import random_qtensor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--shape", default="4096x14336", help="KxN")
    ap.add_argument("--keep", help="write each kernel's Triton IR and SASS here")
    ap.add_argument("--cuda", metavar="REGEX", help="the CUDA library's kernels matching REGEX instead")
    args = ap.parse_args()
    if args.cuda:
        return cuda_census(args.cuda)
    k, n = (int(v) for v in args.shape.split("x"))
    for fmt in args.formats.split(","):
        w = random_qtensor(fmt, n, k, jax.random.key(0))
        for m in (int(v) for v in args.m.split(",")):
            kern = pk.select(w, m)
            if kern is None:
                print(f"{fmt} M={m}: no kernel (XLA)")
                continue
            x = jnp.zeros((m, k), jnp.bfloat16)
            with ops.use_backend("pallas"):
                irs = lower_for_cuda(lambda x, w: ops.qdot(x, w), x, w)
            for ir, warps, stages in irs:
                with tempfile.TemporaryDirectory() as tmp:
                    sass, res, ttgir = compile_sm90(ir, warps, stages, tmp)
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        for ext, text in (("ttir", ir), ("ttgir", ttgir), ("sass", sass)):
                            with open(os.path.join(args.keep, f"{fmt}_m{m}.{ext}"), "w") as f:
                                f.write(text)
                loop = innermost_loop(sass)
                print(f"{fmt} M={m} {kern.op} ({warps} warps, {stages} stages): {res}; "
                      f"loop {sum(loop.values())} instructions: "
                      + ", ".join(f"{op} {c}" for op, c in loop.most_common(12)))


if __name__ == "__main__":
    main()
