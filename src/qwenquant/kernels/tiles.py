"""Tile scheduling shared by the Triton GEMM kernels."""

import torch
import triton
import triton.language as tl


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device, for grids sized per SM (persistent / stream-K); 1 elsewhere,
    so under Triton's CPU interpreter a handful of programs walks many tiles and the loops are exercised."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


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


@triton.jit
def tile_ranges(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """The row and column indices of output tile (pid_m, pid_n): (rm, m_mask, rn, rn_c), where rn_c clamps
    columns past N to 0 so weight loads need no mask (the store masks them)."""
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    return rm, rm < M, rn, tl.where(rn < N, rn, 0)
