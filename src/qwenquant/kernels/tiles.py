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


def result_tensor(x2: torch.Tensor, n: int, out: torch.Tensor | None, who: str) -> torch.Tensor:
    """The [M, N] result of a GEMM on x2 [M, K]: ``out`` when given — checked to be contiguous, of x's dtype and
    device and that shape (tests pass one filled with NaN, so a tile a kernel fails to write cannot pass on a stale
    allocation) — else a new tensor."""
    m = x2.shape[0]
    if out is None:
        return torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if out.shape != (m, n) or out.dtype != x2.dtype or out.device != x2.device or not out.is_contiguous():
        raise ValueError(f"{who}: out {out.dtype} {tuple(out.shape)} on {out.device}: expected a contiguous "
                         f"{x2.dtype} [{m}, {n}] tensor on {x2.device}")
    return out


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
