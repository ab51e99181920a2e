"""Launching our Triton kernels without Triton's per-call Python.

``kernel[grid](*args, **constexprs)`` (Triton 3.6's JIT launch) does, at every call: bind the arguments, specialize
each one (dtype, 16-byte alignment, divisibility by 16, == 1), build a cache key string, look the compiled kernel up,
build launch metadata for the launch hooks, and call the compiled kernel's launcher. On the H100 machine's host that
is ≈ 23 µs per call above the launcher itself — 36 µs against 13 µs for the wgmma kernel
(``benchmarks/launch_breakdown.py``, session 14) — and an eager 2048-token prefill makes 144 such calls between
≈ 1700 other launches, so its GPU waited on the host.

``launch_kernel(kernel, grid, args, **kwargs)`` is the JIT launch with a cache in front: the key is the device, every
keyword (constexprs and launch options, by value) and, per runtime argument, the properties Triton specializes it
on (``spec_key``: a refinement of Triton's own specialization, so two calls with one key always share a compiled
kernel — ``tests/test_launch.py`` checks that against Triton's ``native_specialize_impl``). A miss goes through the
JIT launch, which compiles or finds the kernel and launches it; the compiled kernel is kept under the key. A hit
calls ``CompiledKernel.run`` with the bound arguments in signature order (constexprs included, as Triton passes
them) and no launch hooks.

The JIT path is taken whenever the cache cannot stand in for it: Triton's interpreter (``TRITON_INTERPRET=1``),
launch hooks registered (a profiler such as proton), an argument type ``spec_key`` does not know, or
``QWENQUANT_FAST_LAUNCH=0`` (read at import; ``benchmarks/launch_breakdown.py`` and ``prefill_ab.py`` set
``ENABLED`` per variant to compare the two).
"""

from __future__ import annotations

import inspect
import os

import torch
from triton import knobs

from qwenquant.kernels.overlap import INTERPRETED

ENABLED = os.environ.get("QWENQUANT_FAST_LAUNCH", "1") != "0" and not INTERPRETED
_INT32 = range(-2**31, 2**31)
_INT64 = range(-2**63, 2**63)


class Unkeyable(TypeError):
    """An argument whose specialization ``spec_key`` does not model: that call takes Triton's own launch."""


def spec_key(arg) -> object:
    """What Triton's specialization of one runtime argument depends on, as a hashable value.

    Tensors: dtype and whether the base is 16-byte aligned. Ints: == 1 (a constant then), divisible by 16, and
    whether they fit int32 / int64 (else i64 / u64). Bools and None by value; floats by type only (never
    specialized). A TensorDescriptor (Gluon's or Triton's host one): its base's dtype, rank, block shape, shared-memory
    layout and padding (its shape and strides are runtime values). Anything else raises ``Unkeyable``."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None:
        return ("v", arg)
    if isinstance(arg, int):  # Triton: 1 -> constexpr; i32, i64 or u64 by range; 'D' when divisible by 16
        return (arg == 1, arg % 16 == 0, arg in _INT32, arg in _INT64)
    if isinstance(arg, float):
        return float
    block = getattr(arg, "block_shape", None)
    if block is not None and isinstance(getattr(arg, "base", None), torch.Tensor):
        return ("desc", arg.base.dtype, len(arg.shape), tuple(block), getattr(arg, "layout", None),
                getattr(arg, "padding", None))
    raise Unkeyable(f"no specialization key for an argument of type {type(arg).__name__}")


class _Entry:
    __slots__ = ("kernel", "tail")

    def __init__(self, kernel, tail: tuple):
        self.kernel = kernel  # triton CompiledKernel
        self.tail = tail  # the constexpr / defaulted parameters after the positional ones, in signature order


_CACHES: dict[int, dict] = {}  # id(jit function) -> key -> _Entry


def _tail(fn, n_positional: int, kwargs: dict) -> tuple:
    """Values of the parameters after the first ``n_positional``, in signature order: the keyword given, else the
    parameter's default (as Triton's binder fills them)."""
    out = []
    for p in list(fn.signature.parameters.values())[n_positional:]:
        if p.name in kwargs:
            out.append(kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            raise TypeError(f"{getattr(fn, '__name__', fn)}: parameter {p.name!r} was neither passed nor has a default")
    return tuple(out)


def _hooks_registered() -> bool:
    rt = knobs.runtime  # HookChain objects in Triton 3.6 (empty: no hook), None in older releases
    return any(getattr(h, "calls", h is not None) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def launch_kernel(fn, grid: tuple, args: tuple, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``: ``args`` are the kernel's leading runtime parameters, positionally; ``kwargs``
    its constexprs and launch options (num_warps, num_stages, maxnreg, launch_pdl, …). Same effect as Triton's
    launch, through the cache above when it can stand in (module docstring)."""
    if not ENABLED:
        fn[grid](*args, **kwargs)
        return
    cache = _CACHES.setdefault(id(fn), {})
    try:
        key = (torch.cuda.current_device(), tuple(kwargs.items()), tuple(spec_key(a) for a in args))
        entry = cache.get(key)  # hashing the key: an unhashable keyword value raises TypeError here
    except (Unkeyable, TypeError):
        fn[grid](*args, **kwargs)
        return
    if entry is None or _hooks_registered():
        compiled = fn[grid](*args, **kwargs)
        launchable = getattr(compiled, "run", None) is not None and getattr(compiled, "function", None) is not None
        if entry is None and launchable:  # the interpreter returns no compiled kernel
            cache[key] = _Entry(compiled, _tail(fn, len(args), kwargs))
        return
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    ck = entry.kernel
    stream = torch._C._cuda_getCurrentRawStream(key[0])  # the current stream's handle, as Triton's launch gets it
    ck.run(g0, g1, g2, stream, ck.function, ck.packed_metadata, None, None, None, *args, *entry.tail)


def cached_kernels() -> int:
    """How many compiled kernels the cache holds (tests, diagnostics)."""
    return sum(len(c) for c in _CACHES.values())


def ptxas_usage(compiled, arch: str = "sm_90a") -> dict:
    """Registers per thread, spilled bytes and shared memory of a kernel compiled offline (a module's
    ``compile_for_sm90``), from ``ptxas -v`` — the Triton wheel's own ptxas, so no GPU is needed:
    {"registers", "spill_bytes", "shared_bytes", "report"} (the report: ptxas's whole output, for its warnings).
    Raises with the report if ptxas fails."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    report = info.stdout + info.stderr
    if info.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report[-2000:]}")
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "shared_bytes": compiled.metadata.shared, "report": report}
