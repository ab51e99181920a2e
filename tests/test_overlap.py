"""The overlap switches of the k-tiled kernels (``kernels/overlap.py``) on a CPU machine: off, validated, and the
scale-group count the L2 prefetch covers."""

import pytest
import torch

pytest.importorskip("triton")

from qwenquant.kernels import overlap  # noqa: E402
from qwenquant.kernels import wq_ktiled as KT  # noqa: E402


def test_overlap_is_off_by_default_and_without_a_hopper_gpu(monkeypatch):
    import os

    if "QWENQUANT_PDL" not in os.environ:
        assert overlap.PDL_ENABLED is False
    if "QWENQUANT_PREFETCH_TILES" not in os.environ:
        assert KT.PREFETCH_TILES == 0
    assert KT.PDL_TRIGGER_SPLIT in (0, 1) and KT.PDL_TRIGGER_WHOLE in (0, 1, 2)
    assert not overlap.pdl_ok("cpu", True)
    assert not overlap.prefetch_ok("cpu")
    consts, launch = KT._overlap_args(torch.device("cpu"), 4, 128, prefetch=4, pdl=True, trigger=1, split=False)
    assert consts["PREFETCH"] == 0 and consts["PDL"] is False and launch == {}
    # under Triton's interpreter nothing that compiles inline PTX is switched on, whatever the device
    monkeypatch.setattr(overlap, "INTERPRETED", True)
    assert not overlap.pdl_ok("cuda", True) and not overlap.prefetch_ok("cuda")


@pytest.mark.parametrize("prefetch,trigger", [(-1, 1), (2, 3)])
def test_bad_overlap_arguments_name_the_value(prefetch, trigger):
    with pytest.raises(ValueError, match=f"prefetch={prefetch}, trigger={trigger}"):
        KT._overlap_args(torch.device("cpu"), 4, 128, prefetch=prefetch, pdl=None, trigger=trigger, split=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256, 512, 1024, 4096])
@pytest.mark.parametrize("prefetch", [1, 2, 3, 4, 8])
def test_prefetch_covers_every_scale_group_it_spans(bits, group, prefetch):
    """From any tile-aligned start, PREFETCH k-tiles touch at most ``_prefetch_groups`` scale groups (the kernel
    prefetches that many group rows, clamped to the last one it needs)."""
    t = KT.tile_columns(bits)
    if not (group % t == 0 or t % group == 0):
        pytest.skip("a group the k-tiled layout does not take")
    bound = KT._prefetch_groups(bits, group, prefetch)
    assert bound & (bound - 1) == 0  # a power of two: a tl.arange length
    k = 16 * max(t, group)
    for k_start in range(0, k, t):
        end = min(k_start + prefetch * t, k)
        assert len({c // group for c in range(k_start, end)}) <= bound
