"""Fused mixture-of-experts weights as per-expert linear layers, so 2:4 reaches the experts.

transformers 5 holds the experts of Mixtral, Qwen2/3-MoE, OLMoE, ... as 3-D parameters of one module decorated
with ``use_experts_implementation`` (``gate_up_proj`` ``[experts, 2·ffn, d]`` or ``up_proj``, and
``down_proj`` ``[experts, d, ffn]``; ``[experts, K, out]`` when the class sets ``is_transposed``). No linear
layer holds them, so training, pruning and serving, which all work on linear layers, would leave most of an MoE
model's weights dense.

:func:`unfuse_experts` replaces each such module by :class:`UnfusedExperts`: the same computation (routing is
the caller's; each expert's tokens go through ``gate_up_proj`` -> the class's own gate -> ``down_proj``, scaled
by their routing weight and summed, as transformers' eager path does) with every expert's matrices as
``nn.Linear`` layers named ``<module>.<expert>.<param>`` (``model.layers.0.mlp.experts.3.down_proj``). Each
``weight`` is ``[out, K]``, K the input features, so the N:M groups of sparsert's masks, pruners and kernels
run along K for experts as for any layer. The unfused modules are recorded on the model
(:data:`UNFUSED_ATTR`); :func:`fused_expert_state` stacks such a state dict back into the fused parameters
transformers loads.

Only the layouts transformers documents are unfused (concatenated or interleaved gate/up, transposed or not,
with or without biases); an experts module with anything else (a post-expert norm, expert parallelism, other
parameters or buffers) is left fused and stays dense, as :func:`~sparsert.runtime.linear_swap.
weights_outside_linears` reports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

UNFUSED_ATTR = "sparsert_unfused_experts"
"""Model attribute: fused experts module name -> :class:`FusedLayout` of the modules :func:`unfuse_experts`
replaced."""

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FusedLayout:
    """How a fused experts module held its weights: ``params`` (``("gate_up_proj", "down_proj")`` or
    ``("up_proj", "down_proj")``), ``num_experts``, ``transposed`` (stored ``[experts, K, out]``) and ``bias``
    (``<param>_bias`` ``[experts, out]`` beside each)."""

    params: tuple[str, ...]
    num_experts: int
    transposed: bool
    bias: bool


def _fused_layout(module: nn.Module) -> FusedLayout | None:
    """The layout of a transformers fused experts module, or None when it is not one this module can unfuse."""
    if not isinstance(getattr(module, "is_transposed", None), bool) or getattr(module, "_is_expert_parallel", False):
        return None
    if getattr(module, "has_post_expert_norm", False):
        return None
    has_gate = getattr(module, "has_gate", True)
    params = ("gate_up_proj" if has_gate else "up_proj", "down_proj")
    bias = bool(getattr(module, "has_bias", False))
    own = dict(module.named_parameters(recurse=False))
    expected = set(params) | ({f"{p}_bias" for p in params} if bias else set())
    if set(own) != expected or any(b.numel() for b in module.buffers()):
        return None
    if any(p.numel() for sub in module.children() for p in sub.parameters()):
        return None  # a norm or other weights beside the experts: not a layout we rebuild
    first = own[params[0]]
    if first.dim() != 3 or own[params[1]].dim() != 3 or first.shape[0] != own[params[1]].shape[0]:
        return None
    return FusedLayout(params, int(first.shape[0]), module.is_transposed, bias)


def fused_experts_modules(model: nn.Module) -> dict[str, FusedLayout]:
    """The model's fused experts modules :func:`unfuse_experts` can unfuse: name -> layout, in module order."""
    found = {}
    for name, module in model.named_modules():
        layout = _fused_layout(module)
        if layout is not None:
            found[name] = layout
    return found


class ExpertLinears(nn.Module):
    """One expert's matrices as ``nn.Linear`` layers named like the fused parameters (``gate_up_proj`` or
    ``up_proj``, and ``down_proj``), weights ``[out, K]``."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        super().__init__()
        for name, linear in linears.items():
            self.add_module(name, linear)


class UnfusedExperts(nn.Module):
    """A fused experts module's computation over per-expert linear layers (children ``"0"``, ``"1"``, ...).

    ``forward(hidden_states [tokens, d], top_k_index int [tokens, k], top_k_weights [tokens, k]) -> [tokens, d]``,
    the signature of transformers' experts modules; tokens routed to an index outside ``[0, experts)`` are
    dropped, as transformers drops them. In training (train mode with gradients) every expert runs, on zero rows
    when no token chose it, so every expert parameter gets a gradient: the same parameter set on every
    data-parallel rank.
    """

    def __init__(self, experts: list[ExpertLinears], layout: FusedLayout, gate: Callable[[torch.Tensor], torch.Tensor],
                 fused: nn.Module | None = None):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.layout = layout
        self._gate = gate  # the fused class's own gate (or activation), bound to the emptied fused module
        self._fused = [fused]  # the emptied fused module (a list: not a child), for refuse_experts
        self.register_state_dict_post_hook(_fuse_served_state)
        self.register_load_state_dict_pre_hook(_split_fused_state)

    def expert(self, e: int) -> ExpertLinears:
        return self.get_submodule(str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return self._forward_traced(hidden_states, top_k_index, top_k_weights)
        first, down = self.layout.params
        out = torch.zeros_like(hidden_states)
        if self.training and torch.is_grad_enabled():
            # every expert runs (those without tokens on zero rows): each gets a gradient, zero when unused, so
            # every data-parallel rank reduces the same parameters (DDP, FSDP2) and one process trains alike
            hit = range(self.layout.num_experts)
        else:
            with torch.no_grad():  # one host sync for the experts that got tokens, not one per expert
                routed = top_k_index[(top_k_index >= 0) & (top_k_index < self.layout.num_experts)]
                hit = torch.unique(routed).tolist()
        for e in hit:
            token_idx, slot = torch.where(top_k_index == e)
            expert = self.expert(e)
            h = self._gate(getattr(expert, first)(hidden_states[token_idx]))
            h = getattr(expert, down)(h) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def _forward_traced(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """The computation as a graph (``torch.export``, e.g. for ONNX): every expert in turn takes the tokens
        routed to it (a data-dependent count, ``NonZero`` + ``GatherND``), multiplies them by its constant weights
        (a ``MatMul``/``Gemm`` per expert matrix, which the exporter can annotate and quantize) and adds its scaled
        outputs back (``GatherND`` + ``Add`` + ``ScatterND`` without a reduction attribute, which TensorRT's ONNX
        parser does not apply: a router's top-k picks an expert at most once per token, so the rows are
        distinct)."""
        first, down = self.layout.params
        out = torch.zeros_like(hidden_states)
        for e in range(self.layout.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            expert = self.expert(e)
            h = self._gate(getattr(expert, first)(hidden_states[token_idx]))
            h = getattr(expert, down)(h) * top_k_weights[token_idx, slot, None]
            out = out.index_put((token_idx,), out[token_idx] + h.to(out.dtype))
        return out


def _fused_entries(layout: FusedLayout) -> list[tuple[str, str, str]]:
    """``(param, kind, fused name)``: every expert's ``<e>.<param>.<kind>`` (kind ``weight`` or ``bias``) stacks
    into the fused module's ``<fused name>`` (``<param>`` or ``<param>_bias``)."""
    kinds = ("weight", "bias") if layout.bias else ("weight",)
    return [(p, kind, p if kind == "weight" else f"{p}_bias") for p in layout.params for kind in kinds]


def _serves(module: UnfusedExperts) -> bool:
    """Whether the experts are served (some swapped to sparsert's kernels, the rest plain linears): their state is
    then their weights alone, saved in transformers' fused layout. Training modules (masks) keep per-expert state."""
    linears = [getattr(module.expert(e), p) for e in range(module.layout.num_experts) for p in module.layout.params]
    served = [hasattr(linear, "served_weight") for linear in linears]
    return any(served) and all(s or type(linear) is nn.Linear for s, linear in zip(served, linears, strict=True))


def _fuse_served_state(module: UnfusedExperts, state: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` of served experts: the per-expert ``<e>.<param>.weight`` / ``.bias`` entries stacked into the
    fused ``<param>`` / ``<param>_bias`` tensors transformers holds (:func:`fused_expert_state`), so a served MoE
    model saves (``save_pretrained``) to a checkpoint transformers loads."""
    if _serves(module):
        _stack_experts(state, prefix, module.layout)


def _split_fused_state(module: UnfusedExperts, state: dict, prefix: str, *_: object) -> None:
    """``load_state_dict`` of fused expert tensors (as :func:`_fuse_served_state` or transformers write them):
    split into the per-expert entries the expert layers load."""
    layout = module.layout
    for param, kind, source in _fused_entries(layout):
        fused = state.pop(f"{prefix}{source}", None)
        if fused is None:
            continue
        for e in range(min(layout.num_experts, len(fused))):  # a short tensor: the missing experts are missing
            part = fused[e]
            state[f"{prefix}{e}.{param}.{kind}"] = part.t() if kind == "weight" and layout.transposed else part


def _gate_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if getattr(module, "has_gate", True):
        return functools.partial(type(module)._apply_gate, module)
    return module.act_fn


def expert_weight(module: nn.Module, layout: FusedLayout, param: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s matrix ``param`` of a fused experts module as ``[out, K]`` (K = its input features,
    the axis of the 2:4 groups): a detached view of the fused parameter (transposed for a transposed layout)."""
    w = getattr(module, param).detach()[expert]
    return w.t() if layout.transposed else w


def _unfuse(module: nn.Module, layout: FusedLayout) -> UnfusedExperts:
    experts = []
    params = {p: getattr(module, p) for p in layout.params}
    biases = {p: getattr(module, f"{p}_bias") for p in layout.params} if layout.bias else {}
    for e in range(layout.num_experts):
        linears = {}
        for p, fused in params.items():
            w = expert_weight(module, layout, p, e).contiguous().clone()  # its own storage: safetensors refuses views
            linear = nn.Linear(w.shape[1], w.shape[0], bias=layout.bias, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=fused.requires_grad)
            if layout.bias:
                linear.bias = nn.Parameter(biases[p].detach()[e], requires_grad=biases[p].requires_grad)
            linears[p] = linear
        experts.append(ExpertLinears(linears))
    for p in list(params) + [f"{p}_bias" for p in biases]:
        delattr(module, p)  # the experts' linears hold the values now; the emptied module keeps only its gate
    return UnfusedExperts(experts, layout, _gate_of(module), fused=module)


def unfuse_experts(model: nn.Module, modules: Collection[str] | None = None) -> list[str]:
    """Replace every fused experts module of ``model`` (:func:`fused_experts_modules`; only those named in
    ``modules`` when given) by :class:`UnfusedExperts` in place, same outputs up to the order of float additions;
    each expert's matrices are copied out of the fused parameters, which are then dropped. Records them on the
    model (:data:`UNFUSED_ATTR`); returns the names of the expert linear layers created
    (``<module>.<expert>.<param>``)."""
    created = []
    record = dict(getattr(model, UNFUSED_ATTR, {}))
    for name, layout in fused_experts_modules(model).items():
        if modules is not None and name not in modules:
            continue
        model.set_submodule(name, _unfuse(model.get_submodule(name), layout))
        record[name] = layout
        created += _layer_names(name, layout)
    if record:
        setattr(model, UNFUSED_ATTR, record)
    return created


def refuse_experts(model: nn.Module, modules: Collection[str]) -> None:
    """Undo :func:`unfuse_experts` for the named experts modules, whose expert layers must still be the
    ``nn.Linear`` layers it made: their weights are stacked back into the fused module's parameters, which takes
    its place again (used to leave a model as it was when a later step fails)."""
    if not modules:
        return
    record = dict(getattr(model, UNFUSED_ATTR, {}))
    for name in modules:
        unfused = model.get_submodule(name)
        layout, fused = unfused.layout, unfused._fused[0]
        for param, kind, target in _fused_entries(layout):
            linears = [getattr(unfused.expert(e), param) for e in range(layout.num_experts)]
            parts = [getattr(linear, kind).detach() for linear in linears]
            if kind == "weight" and layout.transposed:
                parts = [w.t() for w in parts]
            grad = getattr(linears[0], kind).requires_grad
            setattr(fused, target, nn.Parameter(torch.stack(parts), requires_grad=grad))
        model.set_submodule(name, fused)
        record.pop(name, None)
    setattr(model, UNFUSED_ATTR, record)


def unfused_experts_of(model: nn.Module) -> dict[str, FusedLayout]:
    """The experts modules :func:`unfuse_experts` replaced in ``model``: name -> layout."""
    return dict(getattr(model, UNFUSED_ATTR, {}))


def expert_layer_names(model: nn.Module) -> list[str]:
    """The per-expert linear layer names of the unfused experts of ``model``."""
    return [n for name, layout in unfused_experts_of(model).items() for n in _layer_names(name, layout)]


def _layer_names(module_name: str, layout: FusedLayout) -> list[str]:
    return [f"{module_name}.{e}.{p}" for e in range(layout.num_experts) for p in layout.params]


def fused_expert_state(state: dict[str, torch.Tensor], unfused: dict[str, FusedLayout]) -> dict[str, torch.Tensor]:
    """A state dict of a model with unfused experts -> the fused layout transformers loads (new dict).

    Each ``<module>.<e>.<param>.weight [out, K]`` is stacked into ``<module>.<param>`` ``[experts, out, K]``
    (``[experts, K, out]`` for a transposed layout), each ``.bias`` into ``<module>.<param>_bias``; other
    entries pass through. KeyError naming the tensor when an expert's entry is missing."""
    fused = dict(state)
    for name, layout in unfused.items():
        _stack_experts(fused, f"{name}.", layout)
    return fused


def _stack_experts(state: dict[str, torch.Tensor], prefix: str, layout: FusedLayout) -> None:
    """In place: every expert's ``{prefix}<e>.<param>.<kind>`` popped and stacked into ``{prefix}<fused name>``
    (:func:`_fused_entries`; weights transposed back for a transposed layout). KeyError naming a missing entry."""
    for param, kind, target in _fused_entries(layout):
        keys = [f"{prefix}{e}.{param}.{kind}" for e in range(layout.num_experts)]
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"the state dict lacks '{missing[0]}' to fuse {prefix}{target}")
        parts = [state.pop(k) for k in keys]
        if kind == "weight" and layout.transposed:
            parts = [w.t() for w in parts]
        state[f"{prefix}{target}"] = torch.stack(parts)
