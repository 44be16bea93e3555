"""Serve any torch model's 2:4 linears on sparsert's kernels: :func:`swap_sparse_linears`.

The job torchao's ``to_sparse_semi_structured`` / ``sparsify_`` did before torchao dropped its sparsity module:
take a model whose linear weights carry the 2:4 pattern (a Hugging Face checkpoint that ``sparsert train
--model ... --save-hf`` wrote, or any ``nn.Module``), pack each weight (2:4, optionally INT4 on the kept values,
:func:`~sparsert.runtime.packed_linear.pack_linear`) and put a
:class:`~sparsert.runtime.dispatch.SparseLinearGPU` in the layer's place:

- on a GPU (the layer's weight on ``cuda``), the dispatcher measures our 2:4 / W4A16 kernels and cuSPARSELt per
  token-count bucket and keeps the fastest correct one; ``token_counts`` decides the buckets at swap time, layer
  by layer, and frees every format no bucket chose, so device memory holds only the chosen formats (3.125 bits
  per weight for 2:4 + INT4 g128 on our W4A16 kernel);
- on the CPU the same packed formats run through the kernels' torch fallbacks (x rounded to ``dtype``, fp32
  accumulation): the correct, compact CPU path for checking a model before it is deployed, not a fast one.

Layers: every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's ``[in, out]`` linear, packed transposed),
except an output head called ``lm_head`` and any layer whose weight is an embedding's (tied), as in Hu et al.
(ICML 2024) and the AST paper (Huang et al., AAAI 2025), which keep embeddings and the head dense. By default
the layers already 2:4 along K (the input dimension) are swapped and the rest are listed as left dense;
``prune=True`` prunes every chosen layer to 2:4 by magnitude first (one-shot, no calibration: for models not
trained sparse, train or prune them with ``sparsert train`` / ``sparsert compress --prune`` instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsert.runtime.dispatch import Dispatcher, GemmBackend, OursSparse24, OursW4A16, SparseLinearGPU
from sparsert.runtime.errors import ConfigError
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.runtime.packed_linear import pack_linear

GEMM_DTYPES = (torch.bfloat16, torch.float16)
HEAD_NAMES = ("lm_head",)


@dataclass
class SwapReport:
    """What :func:`swap_sparse_linears` did.

    ``swapped``: layer -> the format it holds (``"2:4"`` or ``"2:4+int4 g<group>"``); ``left_dense``: layer ->
    why it was not swapped; ``backends``: layer -> {token bucket: chosen backend} for the tuned buckets;
    ``dense_fallback``: swapped layers that no sparse backend could prepare (they run the decompressed weight,
    16 bits per weight) -> the backends' reasons; ``weight_bytes`` / ``weights``: memory of the swapped layers'
    weight formats as held now (bias excluded) and their original weight count.
    """

    swapped: dict[str, str] = field(default_factory=dict)
    left_dense: dict[str, str] = field(default_factory=dict)
    backends: dict[str, dict[int, str]] = field(default_factory=dict)
    dense_fallback: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0
    weights: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.weights if self.weights else 0.0

    def summary(self) -> str:
        text = (f"{len(self.swapped)} linear layers swapped ({self.bits_per_weight:.3f} bits/weight held), "
                f"{len(self.left_dense)} left dense")
        if self.dense_fallback:
            text += f", {len(self.dense_fallback)} on the dense fallback"
        return text


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (``y = x @ W + b``, W ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _weight_nk(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, K]`` (a Conv1D's transposed view)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _choose_layers(model: nn.Module, names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """(layers to swap, layers left dense with the reason) before the 2:4 check."""
    modules = dict(model.named_modules())
    if names is None:
        chosen, left = [], {}
        embeddings = {m.weight.data_ptr() for m in modules.values() if isinstance(m, nn.Embedding)} - {0}  # 0: meta
        for name, module in modules.items():
            if not _is_linear(module) or isinstance(module, SparseLinearGPU):
                continue
            if name.rpartition(".")[2] in HEAD_NAMES:
                left[name] = "the output head stays dense"
            elif module.weight.data_ptr() in embeddings:
                left[name] = "its weight is an embedding's (tied)"
            else:
                chosen.append(name)
        return chosen, left
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"swap_sparse_linears: names must be a list of layer names, got {names!r}")
    for name in names:
        if name not in modules:
            raise ConfigError(f"swap_sparse_linears: the model has no layer {name!r}")
        if not _is_linear(modules[name]):
            raise ConfigError(f"swap_sparse_linears: layer {name!r} is a {type(modules[name]).__name__}, not a "
                              "linear layer (nn.Linear or transformers Conv1D)")
    return list(dict.fromkeys(names)), {}


def _check_options(int4: bool, group_size: int, dtype: torch.dtype | None, token_counts) -> None:
    if not isinstance(int4, bool):
        raise ConfigError(f"swap_sparse_linears: int4 must be True or False, got {int4!r}")
    if int4 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
                 or group_size % 4):
        raise ConfigError(f"swap_sparse_linears: group_size must be a positive multiple of 4, got {group_size!r}")
    if dtype is not None and dtype not in GEMM_DTYPES:
        raise ConfigError(f"swap_sparse_linears: dtype must be torch.bfloat16 or torch.float16 (the GEMMs' "
                          f"activation dtype), got {dtype!r}")
    if token_counts is not None and (isinstance(token_counts, (str, int)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in token_counts)):
        raise ConfigError(f"swap_sparse_linears: token_counts must be a list of positive ints, got {token_counts!r}")


def _cpu_backends() -> list[GemmBackend]:
    # On the CPU every variant of a kernel is the same torch fallback: one candidate per format is enough.
    return [OursSparse24("medium"), OursW4A16("prefill")]


def _default_dispatcher(device: torch.device) -> Dispatcher:
    if device.type == "cuda":
        from sparsert.runtime.device import get_device  # noqa: PLC0415 - only on a GPU

        return Dispatcher(get_device(device.index or 0).name)
    return Dispatcher("cpu", persist=False, warmup=0, reps=1)  # one candidate per format: nothing to time


@torch.no_grad()
def swap_sparse_linears(model: nn.Module, names: Sequence[str] | None = None, *, int4: bool = False,
                        group_size: int = 128, prune: bool = False, dtype: torch.dtype | None = None,
                        token_counts: Sequence[int] | None = (1, 16, 128, 2048), allow_dense: bool = False,
                        dispatcher: Dispatcher | None = None) -> SwapReport:
    """Replace ``model``'s 2:4 linear layers, in place, by :class:`SparseLinearGPU` layers on sparsert's kernels.

    Args:
        model: any ``nn.Module``; each layer stays on its weight's device (``cuda``: our kernels / cuSPARSELt by
            measured time; ``cpu``: the kernels' torch fallbacks).
        names: the layers to swap (module names); default: every linear but the output head and tied layers,
            of which those whose weight is 2:4 along K (or all of them with ``prune``).
        int4: quantize the kept values to INT4 with ``group_size`` columns per scale (W4A16 kernel; the GPU
            kernel takes group 64 or a multiple of 128, other groups run the dense fallback).
        prune: prune each chosen layer to 2:4 by magnitude (top 2 |w| of every 4 along K) first; without it a
            named layer that is not 2:4 is an error.
        dtype: the GEMMs' activation dtype (bf16 or fp16; default: the weight's if 16-bit, else bf16). Inputs
            are rounded to it, products accumulate in fp32, outputs come back in the input's dtype.
        token_counts: decide each layer's backend for these token counts now (power-of-two buckets), then free
            the formats no bucket chose; ``None`` decides at each bucket's first call and keeps every format.
        allow_dense: let the dispatcher also choose dense cuBLAS (16 bits per weight) where it is faster.
        dispatcher: share one :class:`Dispatcher` (default: one per device, cached on disk for GPUs).
    Returns:
        :class:`SwapReport`.
    Raises:
        ConfigError naming the layer or option: an unknown or non-linear layer in ``names``, a layer that is
        not 2:4 along K without ``prune``, K not divisible by 4 or by ``group_size``, no 2:4 layer at all.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_sparse_linears: model must be a torch nn.Module, got {type(model).__name__}")
    _check_options(int4, group_size, dtype, token_counts)
    chosen, left = _choose_layers(model, names)
    modules = dict(model.named_modules())
    plans = []
    for name in chosen:
        module = modules[name]
        w = _weight_nk(module)
        out, k = w.shape
        if w.device.type not in ("cuda", "cpu"):
            raise ConfigError(f"swap_sparse_linears: layer {name!r} is on {w.device}; sparsert runs layers on "
                              "cuda or cpu")
        if k % 4:
            problem = f"K={k} (its input features) is not divisible by 4 (2:4 groups run along K)"
        elif int4 and k % group_size:
            problem = f"K={k} is not divisible by the INT4 group size {group_size}"
        elif not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            problem = f"its weight is not a finite float tensor ({w.dtype})"
        elif not prune and not is_nm_sparse(w, 2, 4):
            problem = "its weight is not 2:4 along K (pass prune=True to prune it by magnitude)"
        else:
            plans.append((name, module))
            continue
        if names is not None or problem.startswith("its weight is not a finite"):
            raise ConfigError(f"swap_sparse_linears: layer {name!r} [{out}, {k}]: {problem}")
        left[name] = problem
    if not plans:
        if not left:
            raise ConfigError("swap_sparse_linears: the model has no linear layer (nn.Linear or transformers Conv1D)")
        reasons = "; ".join(f"{n}: {r}" for n, r in list(left.items())[:5])
        raise ConfigError(f"swap_sparse_linears: no linear layer of the model can be swapped ({reasons})")

    report = SwapReport(left_dense=left)
    dispatchers: dict[torch.device, Dispatcher] = {}
    for name, module in plans:
        w = _weight_nk(module)
        device = w.device
        gemm_dtype = dtype or (w.dtype if w.dtype in GEMM_DTYPES else torch.bfloat16)
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        packed = pack_linear(w.detach().float().cpu(), int4_group_size=group_size if int4 else None, bias=bias,
                             name=name)
        if device not in dispatchers:
            dispatchers[device] = dispatcher or _default_dispatcher(device)
        backends = None if device.type == "cuda" else _cpu_backends()
        layer = SparseLinearGPU(packed, device=device, dtype=gemm_dtype, dispatcher=dispatchers[device],
                                backends=backends, allow_dense=allow_dense, name=name)
        if set(layer.backends) == {"dense_cublas"} and not allow_dense:
            report.dense_fallback[name] = "; ".join(f"{k}: {v}" for k, v in layer.prepare_errors.items())
        if token_counts is not None:
            report.backends[name] = layer.tune(list(token_counts))
            layer.drop_unused()
        _set_submodule(model, name, layer)
        report.swapped[name] = f"2:4+int4 g{group_size}" if int4 else "2:4"
        report.weights += packed.out_features * packed.in_features
    for name, _ in plans:
        report.weight_bytes += model.get_submodule(name).weight_nbytes()
    if any(d.type == "cuda" for d in dispatchers):
        torch.cuda.empty_cache()
    if report.dense_fallback:
        first, why = next(iter(report.dense_fallback.items()))
        warnings.warn(f"swap_sparse_linears: {len(report.dense_fallback)} of {len(report.swapped)} swapped layers "
                      f"run the dense fallback (16 bits per weight; no sparse kernel takes them), e.g. {first}: "
                      f"{why}", stacklevel=2)
    return report

