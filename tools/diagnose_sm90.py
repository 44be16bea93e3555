"""Where do the Hopper 2:4 GEMMs lose their time? One GPU call's worth of bottleneck diagnosis.

tools/bench_kernels.py says how fast each kernel is; this says why, so the next kernel change targets the
real bottleneck. On the largest Llama shapes (M = 8192) it times, in one run and against dense cuBLAS:

* ``sparse24_gemm_sm90`` and ``w4a16_sparse24_sm90`` as the library builds them (``full``), and the 256-token
  TMA (``sm90tma_256``) and 2-CTA cluster (``sm90mc_256``) variants of the bf16 kernel unless disabled;
* the same kernels built with ``-DSP24_DIAG=1`` (``mma_only``: the producer loads the first ring of k tiles
  and then only signals the barriers, so the consumers run their wgmmas on shared-memory-resident operands:
  the MMA pipeline's own ceiling);
* built with ``-DSP24_DIAG=2`` (``load_only``: the consumers wait, read their fragments and release the slots
  but issue no wgmma: the global->shared pipeline's own ceiling).

If ``mma_only`` is close to ``full`` the consumer side (wgmma issue, barriers, register A fragments) is the
limit; if ``load_only`` is, the operand traffic is. Both diagnostic builds compute wrong results on purpose;
their outputs are not checked. It also records the host time of one ``sparse24_linear`` / ``w4a16_linear``
call and, for decode, the time per call of back-to-back launches (L2-warm: the launch-latency floor) next to
the L2-flushed single-call time bench_kernels reports.

Without a GPU it prints ``no GPU: nothing measured`` and exits 0.

    python tools/diagnose_sm90.py --out bench/diagnose_sm90.md [--reps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = (("7b down", 4096, 11008), ("13b gate/up", 13824, 5120))  # (label, N, K)
M_PREFILL = 8192
DECODE_SHAPES = (("7b q/k/v/o", 4096, 4096), ("13b gate/up", 13824, 5120))
DIAGS = (("full", 0), ("mma_only", 1), ("load_only", 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/diagnose_sm90.md"), help="markdown table")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    from bench_kernels import cuda_torch

    torch = cuda_torch()
    if torch is None:
        return 0
    from sparsert.runtime.device import get_device

    if get_device(0).arch != "sm_90a":
        print(f"not a Hopper GPU ({get_device(0).arch}): the wgmma kernels do not run here; nothing measured")
        return 0
    return diagnose(torch, args)


def diag_plan(plan, diag: int):
    """``plan`` with its kernel rebuilt under ``-DSP24_DIAG=diag`` (0: the library's own build)."""
    if diag == 0:
        return plan
    spec = dataclasses.replace(plan.spec, name_expressions=(plan.expr,),
                               options=(*plan.spec.options, f"-DSP24_DIAG={diag}"))
    return dataclasses.replace(plan, spec=spec)


def host_us(torch, fn, calls: int = 200) -> float:
    """Host time of one call (launch path only: the GPU work is asynchronous), mean over ``calls``."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / calls * 1e6


def back_to_back_us(torch, fn, host: float, calls: int = 100) -> float:
    """GPU time per call of ``calls`` launches queued back to back between two events (L2-warm). ``host``: one
    call's host time (us); the GPU sleeps (at an assumed 2 cycles/ns) twice as long as queuing all the calls
    takes, so it never runs dry and the result is the GPU's own time per launch, not the host's launch rate."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(max(2_000_000, int(2 * calls * host * 2000)))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1e3 / calls


def diagnose(torch, args) -> int:
    from sparsert.runtime.device import get_device
    from sparsert.runtime.fileio import write_atomic

    dev = get_device(0)
    rows: list[dict] = []
    meta = {"device": dev.name, "arch": dev.arch, "sms": dev.sm_count, "reps": args.reps,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_json = args.out.with_suffix(".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def add(row: dict) -> None:
        """Keep a row and rewrite both files (an interrupted run keeps what it measured)."""
        rows.append(row)
        print(format_row(row), flush=True)
        write_atomic(args.out, to_markdown(meta, rows))
        write_atomic(out_json, json.dumps({"meta": meta, "rows": rows}, indent=1))

    from bench_kernels import Timer

    timer = Timer(torch, args.reps)
    try:
        for seed, (label, n, k) in enumerate(SHAPES, start=1):
            prefill_rows(torch, timer, dev, label, n, k, seed, add)
            torch.cuda.empty_cache()
        for seed, (label, n, k) in enumerate(DECODE_SHAPES, start=10):
            decode_rows(torch, timer, label, n, k, seed, add)
            torch.cuda.empty_cache()
    except KeyboardInterrupt:
        meta["stopped"] = f"interrupted (SIGINT) after {len(rows)} rows"
    except Exception as exc:
        from sparsert.runtime.device import is_sticky_cuda_error

        if not is_sticky_cuda_error(exc):
            raise
        meta["stopped"] = f"kernel fault after {len(rows)} rows: {exc}"[:300]
    md = to_markdown(meta, rows)
    write_atomic(args.out, md)
    print(md)
    return 0


def prefill_rows(torch, timer, dev, label: str, n: int, k: int, seed: int, add) -> None:
    """Dense, then each wgmma kernel (2:4 bf16 and W4A16, 128- and 256-token tiles) full / mma_only /
    load_only, at M = M_PREFILL."""
    import torch.nn.functional as F
    from bench_kernels import build_weights, note_failure

    from sparsert.runtime.sparse_gemm import (
        _launch,
        _null,
        _x_operand,
        kernel_enabled,
        max_smem_per_block,
        plan_sparse24,
        plan_w4a16,
        sparse24_linear,
        w4a16_linear,
    )

    dense24, sp, q4, *_ = build_weights(torch, n, k, seed)
    m = M_PREFILL
    smem = max_smem_per_block(dev.index)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    flops = 2.0 * m * n * k
    base = {"shape": label, "N": n, "K": k, "M": m}

    def dense():
        return F.linear(x, dense24)

    dense_us = timer(dense)
    add({**base, "kernel": "dense cuBLAS", "variant": "-", "us": dense_us, "tflops": flops / dense_us / 1e6,
         "host_us": host_us(torch, dense)})
    # the cp.async kernels, then the TMA producer and the 2-CTA cluster (when not disabled: gpu_session.sh turns
    # them off unless their GPU tests passed in the same call)
    kernels = [("sparse24", "sm90_128"), ("sparse24", "sm90_256"), ("w4a16", "sm90_128"), ("w4a16", "sm90_256"),
               ("sparse24", "sm90tma_256"), ("sparse24", "sm90mc_256")]
    for fam, kern in kernels:
        if not kernel_enabled(kern, include_unverified=True):
            continue
        if fam == "sparse24":
            plan = plan_sparse24(m, n, k, torch.bfloat16, dev.arch, smem, kern)
            kargs = (_x_operand(x, plan), sp.values, sp.meta, _null(), y, m, n, k, 0)
            host = host_us(torch, lambda kern=kern: sparse24_linear(x, sp, out=y, kernel=kern))
        else:
            plan = plan_w4a16(m, n, q4.n_pad, k, torch.bfloat16, q4.ng, dev.arch, smem, dev.sm_count, kern)
            kargs = (_x_operand(x, plan), q4.qweight, q4.meta, q4.scales, _null(), y, m, n, k, 0)
            host = host_us(torch, lambda kern=kern: w4a16_linear(x, q4, out=y, kernel=kern))
        for vname, diag in DIAGS:
            p = diag_plan(plan, diag)
            row = {**base, "kernel": f"{fam} {kern}", "variant": vname, "host_us": host if diag == 0 else None}
            try:
                t = timer(lambda p=p, kargs=kargs: _launch(p.spec, p.expr, dev.index, p.grid, p.block, p.smem,
                                                           *kargs))
                row.update(us=t, tflops=flops / t / 1e6, vs_dense=dense_us / t)
            except Exception as exc:  # a diagnostic build that fails must not hide the others (a fault stops)
                note_failure(row, "error", exc, 300)
            add(row)


def decode_rows(torch, timer, label: str, n: int, k: int, seed: int, add) -> None:
    """M = 1: dense, the W4A16 decode kernel and the 2:4 auto kernel; flushed, back-to-back and host times."""
    import torch.nn.functional as F
    from bench_kernels import build_weights

    from sparsert.runtime.sparse_gemm import sparse24_linear, w4a16_linear

    dense24, sp, q4, *_ = build_weights(torch, n, k, seed)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    for kname, fn in (("dense cuBLAS", lambda: F.linear(x, dense24)),
                      ("w4a16 decode", lambda: w4a16_linear(x, q4, out=y)),
                      ("sparse24 auto", lambda: sparse24_linear(x, sp, out=y))):
        host = host_us(torch, fn)
        add({"shape": label, "N": n, "K": k, "M": 1, "kernel": kname, "variant": "decode", "us": timer(fn),
             "back_to_back_us": back_to_back_us(torch, fn, host), "host_us": host})


def _f(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def format_row(r: dict) -> str:
    return (f"{r['shape']:12s} M={r['M']:<5d} {r['kernel']:22s} {r['variant']:9s} "
            f"{_f(r.get('us'))} us  host {_f(r.get('host_us'))} us  {r.get('error', '')}")


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# sparsert Hopper kernel diagnosis (tools/diagnose_sm90.py)", "",
        f"- device: {meta['device']} ({meta['arch']}, {meta['sms']} SMs); {meta['date']}; median of "
        f"{meta['reps']} L2-flushed runs",
        "- `mma_only`: operands resident in shared memory after the first ring (wgmma pipeline ceiling); "
        "`load_only`: no wgmma (load pipeline ceiling); both compute wrong results on purpose",
        "- `host us`: host time of one library call; `b2b us`: GPU time per call of 100 back-to-back launches "
        "(L2-warm)",
    ]
    if "stopped" in meta:
        lines.append(f"- **stopped**: {meta['stopped']}")
    lines += ["", "| shape | N x K | M | kernel | variant | us | TF/s | vs dense | host us | b2b us | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['N']}x{r['K']} | {r['M']} | {r['kernel']} | {r['variant']} | "
                     f"{_f(r.get('us'))} | {_f(r.get('tflops'), '{:.0f}')} | {_f(r.get('vs_dense'), '{:.2f}x')} | "
                     f"{_f(r.get('host_us'))} | {_f(r.get('back_to_back_us'))} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
