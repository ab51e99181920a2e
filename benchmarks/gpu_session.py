"""One GPU session: correctness tests, then benchmarks, JSON under $OUT. Run on the device machine as

    QWENQUANT_COMMIT=<sha> PYTHONPATH=src python3 benchmarks/gpu_session.py tests gemm e2e

(``QWENQUANT_GEMM_MODES=w4g128-fused,w4g128-auto`` limits the gemm stage to some modes, bf16 always runs.)

Stages run in the order given; each writes $OUT/<stage>.json (tests: $OUT/tests.log) and prints a
short table, so a stage that fails leaves the earlier ones' results behind.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", "runs/gpu_session")


def stage_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", "tests/test_kernels.py", "-p", "no:cacheprovider",
           "--timeout=120", "--durations=12"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"}, timeout=300)
    except subprocess.TimeoutExpired as e:
        print("tests timed out:", (e.stdout or b"")[-3000:])
        return
    with open(f"{OUT}/tests.log", "w") as f:
        f.write(r.stdout + r.stderr)
    print("\n".join((r.stdout + r.stderr).strip().splitlines()[-15:]))


def stage_gemm(models) -> None:
    from qwenquant.bench import gemm

    modes = os.environ.get("QWENQUANT_GEMM_MODES")  # comma-separated subset of bench.gemm.MODES (bf16 always runs)
    res = gemm.run(models=models, modes=modes.split(",") if modes else None)
    with open(f"{OUT}/gemm.json", "w") as f:
        json.dump(res, f, default=str)
    print(summary_gemm(res))


def summary_gemm(res) -> str:
    model = res["results"][0]["model"]  # the first model's table (qwen3-8b or qwen3-8b-merged)
    rows = [r for r in res["results"] if r["model"] == model]
    modes = sorted({r["mode"] for r in rows}, key=list(dict.fromkeys(r["mode"] for r in rows)).index)
    lines = [f"ceilings: copy {res['ceilings']['copy_bytes_per_s']/1e12:.2f} TB/s, bf16 {res['ceilings']['bf16_flops_per_s']/1e12:.0f} TF/s, "
             f"fp8 {res['ceilings']['fp8_rowwise_flops_per_s']/1e12:.0f}, int8 {res['ceilings']['int8_ops_per_s']/1e12:.0f} TOP/s"]
    for proj in dict.fromkeys(r["proj"] for r in rows):
        lines.append(f"-- {model} {proj}: speedup vs bf16 (frac of floor)")
        lines.append("mode".ljust(26) + "".join(f"{m:>12}" for m in sorted({r['m'] for r in rows})))
        for mode in modes:
            d = {r["m"]: r for r in rows if r["proj"] == proj and r["mode"] == mode}
            lines.append(mode.ljust(26) + "".join(
                (f"{d[m]['speedup_vs_bf16']:.2f}({d[m]['frac_of_floor']:.2f})" if m in d and d[m]["speedup_vs_bf16"] else "-").rjust(12)
                for m in sorted({r['m'] for r in rows})))
    errs = [(r["mode"], r["proj"], r["m"], r["rel_err"]) for r in rows if r["rel_err"] is not None and r["rel_err"] > 2e-2]
    if errs:
        lines.append(f"large rel errors: {errs[:20]}")
    return "\n".join(lines)


def stage_e2e() -> None:
    from qwenquant.bench import e2e

    res = e2e.run(out_path=f"{OUT}/e2e.json")
    with open(f"{OUT}/e2e.json", "w") as f:
        json.dump(res, f, default=str)
    print(json.dumps(res["summary"], indent=1, default=str))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    for stage in sys.argv[1:]:
        t = time.time()
        print(f"=== {stage}", flush=True)
        if stage == "tests":
            stage_tests()
        elif stage.startswith("gemm"):
            models = stage.split(":")[1].split(",") if ":" in stage else ["qwen3-8b"]
            stage_gemm(models)
        elif stage == "e2e":
            stage_e2e()
        else:
            raise SystemExit(f"unknown stage {stage!r}; stages: tests, gemm[:model,...], e2e")
        print(f"=== {stage} done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
