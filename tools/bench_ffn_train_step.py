"""GPU training step of a GPT-2-style FFN on 2:4 sparse GEMMs (Hu et al. recipe) vs dense, issue 3.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, report the FFN
training step ~1.6x faster than dense at d = 4096 (seq 2048, their GPU). Issue-3 target: the 2:4 FFN step
(forward + backward through sparse GEMMs, bf16, d = 4096, ffn 4d, 16k tokens) at least 1.3x faster than dense
on the same GPU, recorded with the device name.

FFN: ``Y = Linear(4d -> d)(GELU_tanh(Linear(d -> 4d)(X)))`` with biases (GPT-2). One step = forward, then
``Y.backward(G)`` with a fixed random ``G`` (input, weight and bias gradients; ``.grad`` reset to None before
each step). Variants, interleaved repetition by repetition in the same run, on the same weights and inputs:

* ``dense`` — ``F.linear`` (cuBLAS) on the dense weights;
* ``2:4 ours`` — :class:`sparsert.train.sparse24_training_linear.Sparse24TrainingLinear` (transposable
  masks; every step: compress ``W⊙M`` and ``(W⊙M)ᵀ``, sparse forward GEMM, sparse ``∇X`` GEMM, MVUE24
  ``∇W`` as one sparse GEMM);
* ``2:4 ours, exact ∇W`` — the same with ``∇W = ∇Zᵀ·X`` on cuBLAS (isolates the MVUE24 path);
* ``2:4 cuSPARSELt`` — the same layer with ``gemm="cusparselt"``: the three products on cuSPARSELt through
  torch's binding with the algorithm configuration searched per shape (:mod:`sparsert.runtime.cusparselt`; the
  MVUE24 sample from the same kernel, expanded and recompressed by cuSPARSELt). The target is met when either
  sparse variant (``2:4 ours`` or ``2:4 cuSPARSELt``) reaches it with correct results; both are reported.

Also reported: the forward half of the step alone (as in training: graph recorded), the six GEMMs alone
(dense cuBLAS vs ours on prepared operands), the per-step overheads of ``2:4 ours`` (compression of the
four weight operands, MVUE24 sample+compress of both output gradients, the activation transposes of the
weight-gradient GEMMs) as a share of its step, and the transposable-mask refresh amortised over 40 steps.
Correctness (so a fast wrong kernel cannot pass): ``Y`` and ``∇X`` on the first tokens vs an fp32 autograd
reference on the masked weights, and the second linear's ``∇W`` vs ``S·H`` with the very ``S`` that step
sampled; relative errors <= 1e-2 or the variant FAILs.

Timing: CUDA events around each step, after ``--warmup`` steps per variant, median of ``--repeats``.
Without a GPU it says so and exits 2; ``--device cpu`` runs the same code through the kernels' torch fallbacks
(a smoke test on tiny shapes: nothing it prints is a GPU number).

    python tools/bench_ffn_train_step.py [--d 4096] [--tokens 16384] [--repeats 10] [--warmup 3]
        [--dtype bfloat16] [--device cuda] [--out ffn.md] [--json ffn.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TARGET = 1.3
TOL = 1e-2
MASK_REFRESH_INTERVAL = 40  # Hu et al.'s GPT-2 code
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OURS = "2:4 ours"
OURS_EXACT = "2:4 ours, exact ∇W"
CSLT = "2:4 cuSPARSELt"
TARGETED = (OURS, CSLT)  # the sparse variants the issue-3 target applies to (the Hu recipe as trained)
GEMMS_DENSE = "six GEMMs, dense (F.linear / matmul)"
GEMMS_OURS = "six GEMMs, 2:4 ours (prepared operands)"
GEMMS_CSLT = "six GEMMs, cuSPARSELt with searched configurations (prepared operands)"
CSLT_PART = "cuSPARSELt: "  # prefix of the cuSPARSELt variant's own per-step overheads (shares of its step)
GEMMS_KERNEL = "six GEMMs, 2:4 ours, all with kernel="  # + a sparse24_linear kernel name (Hopper only)
REFRESH = f"transposable mask refresh (both linears), once per {MASK_REFRESH_INTERVAL} steps"


@dataclass
class BenchConfig:
    d: int = 4096
    tokens: int = 16384
    repeats: int = 10
    warmup: int = 3
    dtype: str = "bfloat16"
    device: str = "cuda"
    check_tokens: int = 2048
    seed: int = 0

    @property
    def ffn(self) -> int:
        return 4 * self.d


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (head.stdout.strip() or "unknown") + (" (+uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# The FFN variants
# ---------------------------------------------------------------------------------------------------------

def gelu(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")  # GPT-2's gelu_new


class FFN(nn.Module):
    """``fc2(gelu(fc1(x)))`` over any two linear-like modules."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


def cslt_status(device: str) -> str:
    """'' when the library's cuSPARSELt path can run here, else why not."""
    if device != "cuda":
        return "cuSPARSELt needs a CUDA device"
    from sparsert.runtime.cusparselt import cusparselt_status

    return cusparselt_status()


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

class StepTimer:
    """Seconds of one call: CUDA events on a GPU (synchronised after each call), perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def interleaved_medians(fns: dict, timer: StepTimer, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each callable, run in rounds (one call of each per round) after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------

def device_meta(cfg: BenchConfig) -> dict:
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": _git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": asdict(cfg) | {"ffn": cfg.ffn}}
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta |= {"device": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
                 "sms": props.multi_processor_count,
                 "cusparselt": getattr(torch.backends.cusparselt, "version", lambda: None)()}
        try:
            from sparsert.runtime.device import get_device

            meta["arch"] = get_device(0).arch
        except Exception as exc:  # reported, not fatal: the torch side still names the GPU
            meta["arch"] = f"unknown ({type(exc).__name__})"
    else:
        meta |= {"device": "cpu (torch fallbacks; not a GPU measurement)", "compute_capability": None, "sms": None,
                 "cusparselt": None, "arch": None}
    return meta


def build(cfg: BenchConfig):
    """Weights (GPT-2 init, std 0.02), inputs and the variant models sharing the weights."""
    from sparsert.train.sparse24_training_linear import Sparse24TrainingLinear

    dt, dev = DTYPES[cfg.dtype], torch.device(cfg.device)
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    fc1, fc2 = nn.Linear(cfg.d, cfg.ffn, device=dev, dtype=dt), nn.Linear(cfg.ffn, cfg.d, device=dev, dtype=dt)
    with torch.no_grad():
        for lin in (fc1, fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, device=dev) * 0.02)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, device=dev) * 0.02)
    x = torch.randn(cfg.tokens, cfg.d, generator=g, device=dev).to(dt).requires_grad_(True)
    gy = (torch.randn(cfg.tokens, cfg.d, generator=g, device=dev) * cfg.tokens ** -0.5).to(dt)
    s1 = Sparse24TrainingLinear.from_linear(fc1, seed=cfg.seed * 2 + 1, name="fc1")
    s2 = Sparse24TrainingLinear.from_linear(fc2, seed=cfg.seed * 2 + 2, name="fc2")
    e1 = Sparse24TrainingLinear.from_linear(fc1, seed=0, mvue=False, name="fc1")
    e2 = Sparse24TrainingLinear.from_linear(fc2, seed=0, mvue=False, name="fc2")
    models = {"dense": FFN(fc1, fc2), OURS: FFN(s1, s2), OURS_EXACT: FFN(e1, e2)}
    return fc1, fc2, x, gy, models


def make_step(model: nn.Module, x: torch.Tensor, gy: torch.Tensor, params: list[torch.Tensor]):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        model(x).backward(gy)
    return step


def make_forward(model: nn.Module, x: torch.Tensor):
    def forward():
        model(x)  # graph recorded (x requires grad), freed on return
    return forward


def check_variant(name: str, model: nn.Module, fc1, fc2, masks, x, gy, cfg: BenchConfig) -> dict:
    """One step of ``model``; Y and ∇X on the first tokens vs an fp32 reference (on ``W⊙M`` with ``masks``, a
    pair of [N, K] 0/1 masks, or the dense weights when None), ∇b2; for sparse variants also the second
    linear's ∇W vs ``S·H`` with the very ``S`` that step drew (vs ``∇Yᵀ·H`` for the exact-∇W variant)."""
    from sparsert.train.sparse24_training_linear import TOKEN_PAD, mvue24_sample_dense_t, step_seed

    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    make_step(model, x, gy, params)()
    calls2 = getattr(model.fc2, "calls", 0)  # the step's draw was number calls2 - 1
    n = min(cfg.check_tokens, cfg.tokens)
    w1, w2 = fc1.weight.detach().float(), fc2.weight.detach().float()
    if masks is not None:
        w1, w2 = w1 * masks[0].float(), w2 * masks[1].float()
    with torch.no_grad():
        y = model(x[:n].detach())
    xs = x[:n].detach().float().requires_grad_(True)
    ref = F.linear(gelu(F.linear(xs, w1, fc1.bias.detach().float())), w2, fc2.bias.detach().float())
    ref.backward(gy[:n].float())
    out = {"y_rel_err": rel_err(y, ref.detach()), "dx_rel_err": rel_err(x.grad[:n], xs.grad)}
    out["db2_rel_err"] = rel_err(fc2.bias.grad, gy.float().sum(0))
    if name in (OURS, OURS_EXACT, CSLT):
        with torch.no_grad():
            h = gelu(model.fc1(x.detach())).reshape(-1, cfg.ffn)
            if name == OURS_EXACT:
                dw_ref = gy.float().t() @ h.float()
            else:
                seed2 = model.fc2.seed
                pad = (-cfg.tokens) % TOKEN_PAD
                gp = F.pad(gy, (0, 0, 0, pad)) if pad else gy
                hp = F.pad(h, (0, 0, 0, pad)) if pad else h
                s = mvue24_sample_dense_t(gp.contiguous(), seed=step_seed(seed2, calls2 - 1), offset=0)
                dw_ref = s.float() @ hp.float()
        out["dw2_rel_err"] = rel_err(fc2.weight.grad, dw_ref)
    errs = [v for k, v in out.items() if k.endswith("rel_err")]
    out["ok"] = all(e <= TOL for e in errs)
    return out


def component_times(cfg: BenchConfig, fc1, fc2, models, timer: StepTimer) -> dict:
    """Milliseconds of the 2:4 step's parts, each timed alone, and the six GEMMs alone, dense vs ours."""
    from sparsert.runtime.kernels import transposable_mask
    from sparsert.runtime.sparse_gemm import sparse24_linear
    from sparsert.train.sparse24_training_linear import compress_masked_weight, mvue24_compress_grad

    dt, dev = DTYPES[cfg.dtype], torch.device(cfg.device)
    s1, s2 = models[OURS].fc1, models[OURS].fc2
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 7)
    t = cfg.tokens + (-cfg.tokens) % 64

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    x, h, g1, g2 = rnd(t, cfg.d), rnd(t, cfg.ffn), rnd(t, cfg.ffn), rnd(t, cfg.d)
    w1, w2 = fc1.weight.detach(), fc2.weight.detach()
    k1, k2 = s1.mask.view(torch.bool), s2.mask.view(torch.bool)  # as the module passes them
    parts = {
        "compress W⊙M and (W⊙M)ᵀ (both linears)": lambda: (compress_masked_weight(w1, k1, dt),
                                                         compress_masked_weight(w2, k2, dt)),
        "MVUE24 sample+compress of ∇Z (both linears)": lambda: (mvue24_compress_grad(g1, seed=1),
                                                                 mvue24_compress_grad(g2, seed=2)),
        "activation transposes for ∇W (both linears)": lambda: (x.t().contiguous(), h.t().contiguous()),
        REFRESH: lambda: (transposable_mask(w1), transposable_mask(w2)),
    }
    o1, o2 = compress_masked_weight(w1, k1, dt), compress_masked_weight(w2, k2, dt)
    m1, m2 = mvue24_compress_grad(g1, seed=1), mvue24_compress_grad(g2, seed=2)
    xt, ht = x.t().contiguous(), h.t().contiguous()

    def dense_gemms():
        F.linear(x, w1)
        F.linear(h, w2)
        g2 @ w2
        g1 @ w1
        g2.t() @ h
        g1.t() @ x

    def sparse_gemms(kernel: str = "auto"):
        sparse24_linear(x, o1.weight, kernel=kernel)
        sparse24_linear(h, o2.weight, kernel=kernel)
        sparse24_linear(g2, o2.weight_t, kernel=kernel)
        sparse24_linear(g1, o1.weight_t, kernel=kernel)
        sparse24_linear(ht, m2, kernel=kernel)
        sparse24_linear(xt, m1, kernel=kernel)

    fns = dict(parts) | {GEMMS_DENSE: dense_gemms, GEMMS_OURS: sparse_gemms}
    if CSLT in models:
        fns[GEMMS_CSLT] = cslt_gemms(x, h, g1, g2, w1, w2, k1, k2)
        fns |= cslt_parts(g1, g2, w1, w2, k1, k2)
    # On Hopper, the same six GEMMs with each wgmma variant (and the mma.sp tile auto mostly takes) for all six:
    # which kernel family would make the step fastest, measured in the same run.
    if dev.type == "cuda":
        from sparsert.runtime.device import get_device
        from sparsert.runtime.sparse_gemm import SM90_CONFIGS, kernel_enabled

        if get_device(dev.index or 0).arch == "sm_90a":
            for name in [n for n in ["medium", *(c.name for c in SM90_CONFIGS)]
                         if kernel_enabled(n, include_unverified=True)]:
                fns[GEMMS_KERNEL + name] = lambda name=name: sparse_gemms(name)
    med = interleaved_medians(fns, timer, max(1, cfg.warmup), cfg.repeats)
    return {k: v * 1e3 for k, v in med.items()}


def cslt_gemms(x, h, g1, g2, w1, w2, k1, k2):
    """The six GEMMs of the step on cuSPARSELt from prepared operands (same orientation as the
    ``gemm="cusparselt"`` layer), configurations searched before timing."""
    from sparsert.runtime.cusparselt import tuned
    from sparsert.train.sparse24_training_linear import cslt_compress_grad, cslt_compress_masked_weight

    mm = tuned()
    (a1, a1t), (a2, a2t) = (cslt_compress_masked_weight(w, k, x.dtype) for w, k in ((w1, k1), (w2, k2)))
    s1, s2 = (cslt_compress_grad(g, seed=i) for i, g in ((1, g1), (2, g2)))

    def gemms():
        mm(a1, x.t(), transpose_result=True)
        mm(a2, h.t(), transpose_result=True)
        mm(a2t, g2.t(), transpose_result=True)
        mm(a1t, g1.t(), transpose_result=True)
        mm(s2, h)
        mm(s1, x)

    gemms()  # the searches, outside the timing
    return gemms


def cslt_parts(g1, g2, w1, w2, k1, k2) -> dict:
    """The per-step work of the ``gemm="cusparselt"`` layer besides its GEMMs, with the layer's own functions:
    masking and compressing ``W⊙M`` and ``(W⊙M)ᵀ``, and the dense MVUE24 sample of ∇Z compressed by cuSPARSELt."""
    from sparsert.train.sparse24_training_linear import cslt_compress_grad, cslt_compress_masked_weight

    dt = g1.dtype
    return {CSLT_PART + "mask and compress W⊙M and (W⊙M)ᵀ (both linears)":
            lambda: (cslt_compress_masked_weight(w1, k1, dt), cslt_compress_masked_weight(w2, k2, dt)),
            CSLT_PART + "MVUE24 dense sample + compress of S (both linears)":
            lambda: (cslt_compress_grad(g1, seed=1), cslt_compress_grad(g2, seed=2))}


def run(cfg: BenchConfig) -> dict:
    timer = StepTimer(cfg.device)
    fc1, fc2, x, gy, models = build(cfg)
    s1, s2 = models[OURS].fc1, models[OURS].fc2
    masks = (s1.mask, s2.mask)  # every sparse variant uses these (e1/e2 computed the same masks from the same W)
    notes = {}
    why = cslt_status(cfg.device)
    if why:
        notes[CSLT] = why
    else:
        from sparsert.train.sparse24_training_linear import Sparse24TrainingLinear

        models[CSLT] = FFN(Sparse24TrainingLinear.from_linear(fc1, seed=s1.seed, name="fc1", gemm="cusparselt"),
                           Sparse24TrainingLinear.from_linear(fc2, seed=s2.seed, name="fc2", gemm="cusparselt"))
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    checks = {}
    for name in list(models):
        try:
            checks[name] = check_variant(name, models[name], fc1, fc2, None if name == "dense" else masks, x, gy,
                                         cfg)
        except Exception as exc:  # a variant that cannot run is reported, not fatal for the others
            notes[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if name == "dense":
                raise
            del models[name]
    steps = interleaved_medians({n: make_step(m, x, gy, params) for n, m in models.items()}, timer, cfg.warmup,
                                cfg.repeats)
    fwds = interleaved_medians({n: make_forward(m, x) for n, m in models.items()}, timer, cfg.warmup, cfg.repeats)
    parts = component_times(cfg, fc1, fc2, models, timer) if OURS in models else {}
    return summarize(cfg, steps, fwds, checks, parts, notes)


def summarize(cfg: BenchConfig, steps: dict, fwds: dict, checks: dict, parts: dict, notes: dict) -> dict:
    """Rows with ratios (dense time / variant time, > 1 = faster), the PASS/FAIL of each sparse variant the
    target applies to (``2:4 ours``, ``2:4 cuSPARSELt``) and ``target_result``: PASS when either passes."""
    dense, dense_f = steps["dense"], fwds["dense"]
    rows = []
    for name in [n for n in ("dense", OURS, OURS_EXACT, CSLT) if n in steps or n in notes]:
        row = {"variant": name, "note": notes.get(name, "")}
        if name in steps:
            row |= {"step_ms": steps[name] * 1e3, "fwd_ms": fwds[name] * 1e3, "step_ratio": dense / steps[name],
                    "fwd_ratio": dense_f / fwds[name], "checks": checks.get(name, {})}
        if name in TARGETED:
            row["target"] = TARGET
            if cfg.device != "cuda":
                row["result"] = "n/a (CPU smoke)"
            elif "step_ms" not in row:
                row["result"] = "FAIL (did not run)"
            elif not row["checks"].get("ok", False):
                row["result"] = "FAIL (wrong results)"
            else:
                row["result"] = "PASS" if row["step_ratio"] >= TARGET else "FAIL"
        rows.append(row)
    overhead = {k: v for k, v in parts.items() if k not in (GEMMS_DENSE, GEMMS_OURS, GEMMS_CSLT, REFRESH)
                and not k.startswith((GEMMS_KERNEL, CSLT_PART))}
    ours_ms = steps.get(OURS, 0) * 1e3
    shares = {k: v / ours_ms for k, v in overhead.items()} if ours_ms else {}
    cslt_ms = steps.get(CSLT, 0) * 1e3
    if cslt_ms:
        shares |= {k: v / cslt_ms for k, v in parts.items() if k.startswith(CSLT_PART)}
    refresh = parts.get(REFRESH)
    extra = {"overhead_ms": sum(overhead.values()) if overhead else None,
             "overhead_share": sum(overhead.values()) / ours_ms if overhead and ours_ms else None,
             "mask_refresh_amortized_ms": refresh / MASK_REFRESH_INTERVAL if refresh is not None else None}
    gd, gs = parts.get(GEMMS_DENSE), parts.get(GEMMS_OURS)
    extra["gemm_ratio"] = gd / gs if gd and gs else None
    gc = parts.get(GEMMS_CSLT)
    extra["gemm_cslt_ratio"] = gd / gc if gd and gc else None
    per_kernel = {k[len(GEMMS_KERNEL):]: v for k, v in parts.items() if k.startswith(GEMMS_KERNEL)}
    best = min(per_kernel, key=per_kernel.get) if per_kernel else None
    extra["gemm_best_kernel"] = best
    extra["gemm_best_ratio"] = gd / per_kernel[best] if best and gd else None
    results = {r["variant"]: r["result"] for r in rows if "result" in r}
    passed = [n for n, res in results.items() if res == "PASS"]
    if passed:
        extra["target_result"] = "PASS (" + ", ".join(passed) + ")"
    elif any(res.startswith("n/a") for res in results.values()):
        extra["target_result"] = "n/a (CPU smoke)"
    else:
        extra["target_result"] = "FAIL" if results else "not run"
    return {"rows": rows, "parts_ms": parts, "parts_share": shares, **extra}


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def to_markdown(result: dict) -> str:
    meta, cfg = result["meta"], result["meta"]["config"]
    lines = [
        "# FFN training step: 2:4 sparse GEMMs vs dense (issue 3)",
        "",
        f"- device: {meta['device']}"
        + (f" (cc {meta['compute_capability']}, {meta['arch']}, {meta['sms']} SMs)" if meta["sms"] else "")
        + f"; torch {meta['torch']}, CUDA {meta['cuda']}, cuSPARSELt {meta['cusparselt']}; commit {meta['commit']}; "
        f"{meta['date']}",
        f"- FFN d={cfg['d']} -> {cfg['ffn']} -> {cfg['d']} (GELU tanh, biases), {cfg['tokens']} tokens, "
        f"{cfg['dtype']}; step = forward + backward (∇X, ∇W, ∇b) with a fixed random ∇Y; median of "
        f"{cfg['repeats']} after {cfg['warmup']} warm-up steps, variants interleaved; MVUE24 by the fused "
        "sample-and-compress kernel",
        "- ratio = dense time / variant time (> 1 = faster); fwd = the forward half as in training (graph "
        "recorded); errors: Y and ∇X on the first tokens vs fp32 on the masked weights, ∇W of fc2 vs S·H with "
        "the step's own MVUE24 sample S",
        "",
        "| variant | ms/step | ratio to dense | fwd ms | fwd ratio | target | result | Y err | ∇X err | "
        "∇W2 err | note |",
        "|" + "---|" * 11,
    ]
    for r in result["rows"]:
        c = r.get("checks", {})
        lines.append(
            f"| {r['variant']} | {_f(r.get('step_ms'))} | {_f(r.get('step_ratio'), '{:.3f}x')} | "
            f"{_f(r.get('fwd_ms'))} | {_f(r.get('fwd_ratio'), '{:.3f}x')} | "
            f"{'>= ' + format(r['target'], '.1f') + 'x' if 'target' in r else ''} | {r.get('result', '')} | "
            f"{_f(c.get('y_rel_err'), '{:.1e}')} | {_f(c.get('dx_rel_err'), '{:.1e}')} | "
            f"{_f(c.get('dw2_rel_err'), '{:.1e}')} | {r['note']} |")
    parts, shares = result["parts_ms"], result["parts_share"]
    if parts:
        lines += ["", f"Parts of the `{OURS}` step (`{CSLT_PART}…`: of the `{CSLT}` step), each timed alone:", "",
                  "| part | ms | share of the step |",
                  "|---|---|---|"]
        for k, v in parts.items():
            share = shares.get(k)
            lines.append(f"| {k} | {v:.3f} | {_f(share, '{:.1%}')} |")
        lines += ["", f"- overhead (compression + MVUE24 + transposes): {_f(result['overhead_ms'], '{:.3f}')} ms = "
                  f"{_f(result['overhead_share'], '{:.1%}')} of the step; mask refresh amortised over "
                  f"{MASK_REFRESH_INTERVAL} steps: {_f(result['mask_refresh_amortized_ms'], '{:.3f}')} ms/step",
                  f"- six GEMMs alone, dense / ours: {_f(result['gemm_ratio'], '{:.3f}x')}; dense / cuSPARSELt "
                  f"(searched configurations): {_f(result.get('gemm_cslt_ratio'), '{:.3f}x')}"]
        if result.get("gemm_best_kernel"):
            lines.append(f"- six GEMMs, one kernel for all six, fastest: `{result['gemm_best_kernel']}` "
                         f"({_f(result['gemm_best_ratio'], '{:.3f}x')} of dense)")
    lines += ["", f"Target: a 2:4 step (`{OURS}` or `{CSLT}`) >= {TARGET}x dense: "
              f"{result.get('target_result', 'not run')} "
              f"(Hu et al. report ~1.6x at d=4096 on their GPU)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    ap.add_argument("--d", type=int, default=d.d, help="model width (ffn = 4d); a multiple of 64")
    ap.add_argument("--tokens", type=int, default=d.tokens, help="tokens per step (batch x sequence)")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant first")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=d.device,
                    help="cuda (the measurement) or cpu (a smoke run through the torch fallbacks)")
    ap.add_argument("--check-tokens", type=int, default=d.check_tokens, help="tokens compared with fp32")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    cfg = BenchConfig(d=args.d, tokens=args.tokens, repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
                      device=args.device, check_tokens=args.check_tokens, seed=args.seed)
    if cfg.d <= 0 or cfg.d % 64:
        print(f"error: --d must be a positive multiple of 64 (the sparse GEMMs' k tile), got {cfg.d}", file=sys.stderr)
        return 2
    for flag, v, lo in (("--tokens", cfg.tokens, 1), ("--repeats", cfg.repeats, 1), ("--warmup", cfg.warmup, 0),
                        ("--check-tokens", cfg.check_tokens, 1)):
        if v < lo:
            print(f"error: {flag} must be >= {lo}, got {v}", file=sys.stderr)
            return 2
    if cfg.device == "cuda":
        from sparsert.runtime.device import probe_gpu

        ok, reason = probe_gpu()
        if not ok or not torch.cuda.is_available():
            why = reason if not ok else f"torch {torch.__version__} has no CUDA device"
            print(f"no GPU: nothing measured ({why}); --device cpu runs a smoke test through the torch fallbacks",
                  file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    from sparsert.runtime.fileio import write_atomic

    try:
        result = run(cfg)
    except (Exception, KeyboardInterrupt) as exc:  # one device call may be all there is: record what broke
        traceback.print_exc()
        error = ("interrupted (SIGINT: the time limit) before the table was complete"
                 if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {str(exc)[:1000]}")
        md = f"# FFN training step: 2:4 sparse GEMMs vs dense (issue 3)\n\nerror: {error}\n"
        if args.out:
            write_atomic(args.out, md)
        if args.json:
            write_atomic(args.json, json.dumps({"meta": device_meta(cfg), "error": error}, indent=1,
                                               ensure_ascii=False))
        print(md)
        return 1
    result["meta"] = device_meta(cfg)
    md = to_markdown(result)

    if args.out:
        write_atomic(args.out, md)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1, ensure_ascii=False))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
