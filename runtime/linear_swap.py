"""Serve any torch model's 2:4 linears on sparsert's kernels: :func:`swap_sparse_linears`.

The job torchao's ``to_sparse_semi_structured`` / ``sparsify_`` did before torchao dropped its sparsity module:
take a model whose linear weights carry the 2:4 pattern (the Hugging Face directory ``sparsert train --model``
writes, or any ``nn.Module``), pack each weight (2:4, optionally INT4 on the kept values,
:func:`~sparsert.runtime.packed_linear.pack_linear`) and put a
:class:`~sparsert.runtime.dispatch.SparseLinearGPU` in the layer's place:

- on a GPU (the layer's weight on ``cuda``), the dispatcher measures our 2:4 / W4A16 kernels and cuSPARSELt per
  token-count bucket and keeps the fastest correct one; ``token_counts`` decides the buckets at swap time, layer
  by layer, and frees every format no bucket chose, so device memory holds only the chosen formats (3.125 bits
  per weight for 2:4 + INT4 g128 on our W4A16 kernel);
- on the CPU the packed tensors run through the compiled CPU product (:mod:`sparsert.runtime.sparse_cpu`,
  backend ``cpu_packed``): the kernels' function (x and the kept values rounded to ``dtype``, fp32
  accumulation), no dense copy held: 3.125 bits per weight for 2:4 + INT4 g128, 9 for 2:4 of a bf16/fp16 layer,
  17 for a float32 one (the kept values are packed in the layer's own dtype, so the state dict is exact).

Layers: every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's ``[in, out]`` linear, packed transposed),
except the output head (the model's ``get_output_embeddings()``, or a layer named ``lm_head`` / ``embed_out``),
layers whose weight is an embedding's (tied), and ``nn.MultiheadAttention``'s ``out_proj`` (whose weight the
attention reads directly), as in Hu et al. (ICML 2024) and the AST paper (Huang et al., AAAI 2025), which keep
embeddings and the head dense. By default the layers already 2:4 along K (the input dimension) are swapped and
the rest are listed as left dense; ``prune=True`` prunes every chosen layer to 2:4 by magnitude first (one-shot,
no calibration: for models not trained sparse, train or prune them with ``sparsert train`` / ``sparsert
compress --prune`` instead).

A swapped layer's packed weight is frozen; gradients flow through it to its input (``dX = dY @ W``).

Swap last: after moving and casting the model (a swapped layer stays on its device and formats). The
swapped model still saves: ``state_dict()`` holds each swapped layer's ``weight`` as the weight it serves
(dense, 2:4 zeros in place, INT4 values dequantized; the replaced layer's layout and dtype, on the CPU), so
``save_pretrained`` writes a checkpoint transformers loads; ``load_state_dict`` packs a changed 2:4 weight again.
Unfused MoE experts (:func:`~sparsert.runtime.moe_experts.unfuse_experts`) swapped this way save as the fused
tensors transformers holds.
A model whose own code reads a linear's ``.weight`` in its forward (T5's ``wo``) needs that layer left out
through ``names``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsert.runtime.dispatch import Dispatcher, GemmBackend, SparseLinearGPU, cpu_dispatcher
from sparsert.runtime.errors import ConfigError, SparsertError
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.runtime.packed_linear import pack_linear

GEMM_DTYPES = (torch.bfloat16, torch.float16)
HEAD_NAMES = ("lm_head", "embed_out")
DENSE_BACKEND = "dense_cublas"


class NothingToSwapError(ConfigError):
    """The model has linear layers, and none of them can be swapped (none is 2:4 along K, without ``prune``)."""


@dataclass
class SwapReport:
    """What :func:`swap_sparse_linears` did.

    ``swapped``: layer -> the format it holds (``"2:4"`` or ``"2:4+int4 g<group>"``); ``left_dense``: layer ->
    why it was not swapped; ``backends``: layer -> {token bucket: chosen backend} for the tuned buckets;
    ``dense_fallback``: swapped layers that run their decompressed weight (16 bits per weight) because no sparse
    backend could prepare or run them -> the backends' reasons; ``weight_bytes`` / ``weights``: device (or host)
    memory of the swapped layers' weight formats as held now (bias excluded; rows padded to the kernels' 128-row
    tiles included) and their original weight count; ``outside_linears``: parameter -> shape of the weights no
    linear swap reaches (:func:`weights_outside_linears`: fused MoE experts, convolutions), which stay dense.
    """

    swapped: dict[str, str] = field(default_factory=dict)
    left_dense: dict[str, str] = field(default_factory=dict)
    backends: dict[str, dict[int, str]] = field(default_factory=dict)
    dense_fallback: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0
    weights: int = 0
    outside_linears: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.weights if self.weights else 0.0

    def add(self, other: SwapReport) -> None:
        """Fold in the report of another swap on the same model (other layers)."""
        for name in ("swapped", "left_dense", "backends", "dense_fallback", "outside_linears"):
            getattr(self, name).update(getattr(other, name))
        self.weight_bytes += other.weight_bytes
        self.weights += other.weights

    def summary(self) -> str:
        text = (f"{len(self.swapped)} linear layers swapped ({self.bits_per_weight:.3f} bits/weight held), "
                f"{len(self.left_dense)} left dense")
        if self.dense_fallback:
            text += f", {len(self.dense_fallback)} on the dense fallback"
        if self.outside_linears:
            text += f", {len(self.outside_linears)} weights outside linear layers left dense"
        return text


def _uninitialized(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)  # a Lazy module's: no shape yet


def weights_outside_linears(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The parameters of 3 or more dimensions, name -> shape in module order: fused MoE experts (transformers 5's
    ``experts.gate_up_proj`` ``[experts, 2·ffn, d]``), convolutions. They are not linear layers, so neither
    :func:`swap_sparse_linears` nor ``sparsert train --model`` / ``compress`` makes them 2:4; they stay dense."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if not _uninitialized(p) and p.dim() >= 3}


def outside_linears_note(model: nn.Module, min_share: float = 0.01) -> str | None:
    """One sentence on the model's :func:`weights_outside_linears` when they hold at least ``min_share`` of its
    parameters (None otherwise): how many, their share, the largest."""
    outside = weights_outside_linears(model)
    total = sum(p.numel() for p in model.parameters() if not _uninitialized(p))
    held = sum(math.prod(shape) for shape in outside.values())
    if not outside or not total or held < min_share * total:
        return None
    name, shape = max(outside.items(), key=lambda item: math.prod(item[1]))
    return (f"{len(outside)} weights of 3 or more dimensions ({held / total:.0%} of the model's parameters, e.g. "
            f"{name} {list(shape)}) are not linear layers (fused MoE experts, convolutions) and stay dense")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (``y = x @ W + b``, W ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_nk(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``[out, K]`` (a transformers Conv1D's ``[K, out]`` weight as a transposed view)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is registered under (a module may sit at several places)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError, TypeError):
        return None


def _why_dense(name: str, module: nn.Module, head: nn.Module | None, embeddings: set[int],
               attention_outputs: set[int]) -> str | None:
    """Why the default choice leaves a linear layer dense (None: it is a candidate)."""
    if module is head or name.rpartition(".")[2] in HEAD_NAMES:
        return "the output head stays dense"
    if id(module) in attention_outputs:
        return "nn.MultiheadAttention reads its weight directly"
    weight = module.weight
    if not _uninitialized(weight) and weight.data_ptr() in embeddings:
        return "its weight is an embedding's (tied)"
    return None


def _choose_layers(model: nn.Module, names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """(layers to swap, layers left dense with the reason) before the 2:4 check; one name per module."""
    aliases = _aliases(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    if "" in modules and _is_linear(modules[""]):
        raise ConfigError("swap_sparse_linears: the model is itself a linear layer; the swap replaces layers inside "
                          "a model, so wrap it first (e.g. nn.Sequential(layer))")
    if names is None:
        chosen, left = [], {}
        embeddings = {m.weight.data_ptr() for m in modules.values() if isinstance(m, nn.Embedding)} - {0}  # 0: meta
        attention_outputs = {id(m.out_proj) for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
        head = _output_head(model)
        for name, module in modules.items():
            if not _is_linear(module) or aliases[id(module)][0] != name:
                continue
            why = _why_dense(name, module, head, embeddings, attention_outputs)
            if why is None:
                chosen.append(name)
            else:
                left[name] = why
        return chosen, left
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"swap_sparse_linears: names must be a list of layer names, got {names!r}")
    if not names:
        raise ConfigError("swap_sparse_linears: names is empty (leave it out to swap every 2:4 linear layer)")
    chosen = []
    for name in names:
        if name not in modules:
            raise ConfigError(f"swap_sparse_linears: the model has no layer {name!r}")
        if not _is_linear(modules[name]):
            raise ConfigError(f"swap_sparse_linears: layer {name!r} is a {type(modules[name]).__name__}, not a "
                              "linear layer (nn.Linear or transformers Conv1D)")
        first = aliases[id(modules[name])][0]
        if first not in chosen:
            chosen.append(first)
    return chosen, {}


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"swap_sparse_linears: {name} must be True or False, got {value!r}")


def _check_options(int4: bool, group_size: int, prune: bool, allow_dense: bool, dtype: torch.dtype | None,
                   token_counts, dispatcher) -> list[int] | None:
    """Checked options; returns ``token_counts`` as a list."""
    for value, name in ((int4, "int4"), (prune, "prune"), (allow_dense, "allow_dense")):
        _check_flag(value, name)
    if int4 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
                 or group_size % 4):
        raise ConfigError(f"swap_sparse_linears: group_size must be a positive multiple of 4, got {group_size!r}")
    if dtype is not None and dtype not in GEMM_DTYPES:
        raise ConfigError(f"swap_sparse_linears: dtype must be torch.bfloat16 or torch.float16 (the GEMMs' "
                          f"activation dtype), got {dtype!r}")
    if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
        raise ConfigError(f"swap_sparse_linears: dispatcher must be a sparsert.runtime.dispatch.Dispatcher, got "
                          f"{type(dispatcher).__name__}")
    if token_counts is None:
        return None
    counts = list(token_counts) if not isinstance(token_counts, (str, bytes, int)) else None
    if not counts or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in counts):
        raise ConfigError(f"swap_sparse_linears: token_counts must be a non-empty list of positive ints (or None), "
                          f"got {token_counts!r}")
    return counts


def _default_dispatcher(device: torch.device) -> Dispatcher:
    if device.type == "cuda":
        from sparsert.runtime.device import get_device  # noqa: PLC0415 - only on a GPU

        return Dispatcher(get_device(device.index or 0).name)
    return cpu_dispatcher()


def _described(name: str, module: nn.Module) -> str:
    """``'name' [out, K]`` (the name alone for a lazy layer)."""
    if _uninitialized(module.weight):
        return repr(name)
    out, k = weight_nk(module).shape
    return f"{name!r} [{out}, {k}]"


def _layer_problem(module: nn.Module, int4: bool, group_size: int, prune: bool) -> str | None:
    """Why the layer cannot be swapped as asked (None: it can)."""
    if _uninitialized(module.weight):
        return "its weight is not initialised yet (a lazy layer: run the model once first)"
    w = weight_nk(module)
    out, k = w.shape
    if w.device.type not in ("cuda", "cpu"):
        return f"it is on {w.device}; sparsert runs layers on cuda or cpu"
    if out == 0 or k == 0:
        return "it has no weights"
    if k % 4:
        return f"K={k} (its input features) is not divisible by 4 (2:4 groups run along K)"
    if int4 and k % group_size:
        return f"K={k} is not divisible by the INT4 group size {group_size}"
    if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
        return f"its weight is not a finite float tensor ({w.dtype})"
    if not prune and not is_nm_sparse(w, 2, 4):
        return "its weight is not 2:4 along K (pass prune=True to prune it by magnitude)"
    return None


def _build_layer(name: str, module: nn.Module, *, int4: bool, group_size: int, dtype: torch.dtype | None,
                 token_counts: list[int] | None, allow_dense: bool, dispatcher: Dispatcher,
                 backends: list[GemmBackend] | None = None) -> SparseLinearGPU:
    """The packed, prepared (and tuned) replacement of one layer; ConfigError naming the layer if it cannot be."""
    w = weight_nk(module)
    gemm_dtype = dtype or (w.dtype if w.dtype in GEMM_DTYPES else torch.bfloat16)
    bias = None if module.bias is None else module.bias.detach().float().cpu()
    try:
        # The kept values in the layer's own dtype (exact: the state dict gives them back as they were); on the CPU
        # they are also what the CPU product reads, so a 16-bit layer holds one copy of them, not two.
        values_dtype = w.dtype if w.dtype in GEMM_DTYPES else torch.float32
        packed = pack_linear(w.detach().float().cpu(), int4_group_size=group_size if int4 else None, bias=bias,
                             values_dtype=values_dtype, name=name)
        layer = SparseLinearGPU(packed, device=w.device, dtype=gemm_dtype, dispatcher=dispatcher, name=name,
                                backends=backends, allow_dense=allow_dense, source_dtype=w.dtype,
                                source_transposed=_is_conv1d(module))
        if token_counts is not None:
            layer.tune(token_counts)
            layer.drop_unused()
    except SparsertError as exc:
        raise ConfigError(f"swap_sparse_linears: layer {_described(name, module)}: {exc}") from exc
    return layer


def _dense_fallback(layer: SparseLinearGPU, allow_dense: bool) -> str | None:
    """Why the layer runs its decompressed weight though it was not chosen for speed (None: it does not)."""
    if set(layer.backends) == {DENSE_BACKEND}:
        return "; ".join(f"{k}: {v}" for k, v in layer.prepare_errors.items()) or "no sparse backend prepared it"
    if not allow_dense and DENSE_BACKEND in layer.chosen.values():
        return "every sparse backend was rejected for a tuned token count (see warnings)"
    return None


@torch.no_grad()
def check_swap(model: nn.Module, names: Sequence[str], *, int4: bool = False, group_size: int = 128,
               prune: bool = False) -> None:
    """Raise the ConfigError :func:`swap_sparse_linears` would raise for these named layers and options (an
    unknown or non-linear layer, one not 2:4 along K, K not divisible by 4 or the group size, ...), changing
    nothing: to check several swaps before making the first."""
    _check_options(int4, group_size, prune, False, None, None, None)
    chosen, _ = _choose_layers(model, names)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in chosen:
        problem = _layer_problem(modules[name], int4, group_size, prune)
        if problem is not None:
            raise ConfigError(f"swap_sparse_linears: layer {_described(name, modules[name])}: {problem}")


@torch.no_grad()
def swap_sparse_linears(model: nn.Module, names: Sequence[str] | None = None, *, int4: bool = False,
                        group_size: int = 128, prune: bool = False, dtype: torch.dtype | None = None,
                        token_counts: Sequence[int] | None = (1, 16, 128, 2048), allow_dense: bool = False,
                        dispatcher: Dispatcher | None = None,
                        backends: Sequence[GemmBackend] | None = None) -> SwapReport:
    """Replace ``model``'s 2:4 linear layers, in place, by :class:`SparseLinearGPU` layers on sparsert's kernels.

    Every replacement is built (packed, prepared and tuned) before the first one is put in place, so an error
    leaves the model as it was; meanwhile the dense weights and the new formats are both held.

    Args:
        model: any ``nn.Module``; each layer stays on its weight's device (``cuda``: our kernels / cuSPARSELt by
            measured time; ``cpu``: the compiled CPU product). A layer registered under several names is
            replaced at each.
        names: the layers to swap (module names); default: every linear but the output head, tied and
            ``nn.MultiheadAttention`` output layers, of which those whose weight is 2:4 along K (or all of them
            with ``prune``).
        int4: quantize the kept values to INT4 with ``group_size`` columns per scale (W4A16 kernel; the GPU
            kernel takes K % 128 == 0 and group 64 or a multiple of 128; other layers run the dense fallback).
        prune: prune each chosen layer to 2:4 by magnitude (top 2 |w| of every 4 along K) first; without it a
            named layer that is not 2:4 is an error.
        dtype: the GEMMs' activation dtype (bf16 or fp16; default: the weight's if 16-bit, else bf16). Inputs
            are rounded to it, products accumulate in fp32, outputs come back in the input's dtype.
        token_counts: decide each layer's backend for these token counts now (power-of-two buckets), then free
            the formats no bucket chose; ``None`` decides at each bucket's first call and keeps every format.
        allow_dense: let the dispatcher also choose dense cuBLAS (16 bits per weight) where it is faster.
        dispatcher: share one :class:`Dispatcher` (default: one per device, cached on disk for GPUs).
        backends: the candidate GEMM backends of every layer (default:
            :func:`~sparsert.runtime.dispatch.default_backends` for the layer's device), e.g.
            ``our_backends(device)`` to leave cuSPARSELt out.
    Returns:
        :class:`SwapReport`; a warning when layers run the dense fallback, and (without ``names``) when weights
        outside linear layers (fused MoE experts) hold at least 1% of the parameters.
    Raises:
        ConfigError naming the layer or option: an unknown or non-linear layer in ``names``, a layer that is
        not 2:4 along K without ``prune``, K not divisible by 4 or by ``group_size``, a weight INT4 cannot hold,
        no 2:4 layer at all.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_sparse_linears: model must be a torch nn.Module, got {type(model).__name__}")
    counts = _check_options(int4, group_size, prune, allow_dense, dtype, token_counts, dispatcher)
    candidates = None if backends is None else list(backends)
    if candidates is not None and (not candidates or not all(isinstance(b, GemmBackend) for b in candidates)):
        raise ConfigError(f"swap_sparse_linears: backends must be a non-empty list of GemmBackend objects "
                          f"(sparsert.runtime.dispatch), got {backends!r}")
    chosen, left = _choose_layers(model, names)
    outside = weights_outside_linears(model)
    outside_note = outside_linears_note(model) if names is None else None  # before the swap changes the count
    modules = dict(model.named_modules(remove_duplicate=False))
    plans = []
    for name in chosen:
        problem = _layer_problem(modules[name], int4, group_size, prune)
        if problem is None:
            plans.append(name)
        elif names is not None or problem.startswith(("its weight is not a finite", "its weight is not initialised")):
            raise ConfigError(f"swap_sparse_linears: layer {_described(name, modules[name])}: {problem}")
        else:
            left[name] = problem
    if not plans:
        if not left:
            done = any(isinstance(m, SparseLinearGPU) for m in modules.values())
            raise ConfigError("swap_sparse_linears: " + ("every linear layer of the model is swapped already" if done
                              else "the model has no linear layer (nn.Linear or transformers Conv1D)"))
        reasons = "; ".join(f"{n}: {r}" for n, r in list(left.items())[:5])
        raise NothingToSwapError(f"swap_sparse_linears: no linear layer of the model can be swapped ({reasons})")

    dispatchers: dict[torch.device, Dispatcher] = {}
    built: dict[str, SparseLinearGPU] = {}
    for name in plans:
        device = modules[name].weight.device
        if device not in dispatchers:
            dispatchers[device] = dispatcher or _default_dispatcher(device)
        built[name] = _build_layer(name, modules[name], int4=int4, group_size=group_size, dtype=dtype,
                                   token_counts=counts, allow_dense=allow_dense, dispatcher=dispatchers[device],
                                   backends=candidates)

    report = SwapReport(left_dense=left, outside_linears=outside)
    aliases = _aliases(model)
    for name, layer in built.items():
        for alias in aliases[id(modules[name])]:
            parent, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        report.swapped[name] = f"2:4+int4 g{group_size}" if int4 else "2:4"
        report.weights += layer.in_features * layer.out_features
        report.weight_bytes += layer.weight_nbytes()
        if counts is not None:
            report.backends[name] = dict(layer.chosen)
        why = _dense_fallback(layer, allow_dense)
        if why is not None:
            report.dense_fallback[name] = why
    if any(d.type == "cuda" for d in dispatchers):
        torch.cuda.empty_cache()
    if report.dense_fallback:
        first, why = next(iter(report.dense_fallback.items()))
        warnings.warn(f"swap_sparse_linears: {len(report.dense_fallback)} of {len(report.swapped)} swapped layers "
                      f"run the dense fallback (16 bits per weight; no sparse kernel takes them), e.g. {first}: "
                      f"{why}", stacklevel=2)
    if outside_note is not None:
        warnings.warn(f"swap_sparse_linears: {outside_note}", stacklevel=2)
    return report
