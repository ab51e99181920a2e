"""Tile scheduling shared by the Triton GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row-tiles sweep the column tiles
    together, so consecutive programs share the same operand tiles in L2 (the Triton tutorial's order)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % gm, (pid % per_group) // gm
