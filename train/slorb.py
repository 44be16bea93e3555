"""SLoRB: Sparse Low-Rank Boosting, the extra parameters of AST.

Huang, Hu, Jian, Zhu, Chen, "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training"
(AST), AAAI 2025, §3.4. A 2:4 layer loses the information of its pruned weights; SLoRB gives some of it back
with a cheap structured term:

    y = x · (W ⊙ M)ᵀ + S · (P · x)

- ``P ∈ R^{(K/k) × K}`` sums each group of ``k`` consecutive inputs (row ``g`` is ones on columns
  ``g·k .. g·k + k − 1``); fixed by default, optionally trainable (initialised to the same 0/1 matrix).
- ``S ∈ R^{N × (K/k)}`` is initialised to the mean of the *pruned* weights ``(1 − M) ⊙ W`` over each group:
  ``S[n, g] = (1/k) · Σ_{j in group g} ((1 − M) ⊙ W)[n, j]``. That is the least-squares best approximation
  of the pruned part by a matrix constant on each group of ``k`` columns, so at initialisation the layer is
  closer to the dense one for isotropic inputs. ``k = 16`` adds ``N·K/16`` parameters (6.25% of the layer).

Equivalence and export: with fixed ``P`` the term is exactly the dense matrix ``S·P [N, K]``, constant over
each group of ``k`` columns (:func:`slorb_dense_equivalent`), so ``y = x · (W ⊙ M + S·P)ᵀ``. Folding it into
``W`` would destroy the 2:4 pattern, so it is exported *beside* the sparse weight as one more dense linear:
``S`` is a plain dense weight ``[N, K/k]`` (stored dense in the artifact's float dtype under
``<layer>.slorb.S``) applied to the group sums ``P·x``, which are a fixed linear map — in ONNX a
``Reshape [.., K/k, k]`` + ``ReduceSum(axis=-1)`` — so no ``P`` tensor needs to be stored. A trainable ``P``
(``<layer>.slorb.P`` [K/k, K] in :func:`slorb_tensors`) would need a second MatMul before ``S``; the artifact
format does not carry it and compression refuses it.

End to end (fixed ``P`` only): :func:`attach_slorb` gives every :class:`~sparsert.train.sparse_linear.SparseLinear`
of a model a SLoRB submodule (state-dict name ``<layer>.slorb.S``, so checkpoints carry it),
:func:`slorb_from_state` recovers ``k`` and the layers from a checkpoint's state dict for compression, and the
artifact stores ``S`` dense (float16/float32) under the same name, with ``config.json["slorb"] = {"k", "layers"}``
(docs/FORMAT.md). The inference model (:class:`sparsert.runtime.model.SLoRBLinear`), the ONNX export and the
GPU runtime add the same term. ``S`` is not INT4-quantized: at ``k = 16`` in float16 it costs 1 bit per
original weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ArtifactError, ConfigError, FormatError
from sparsert.runtime.model import ModelConfig, slorb_group_sum, sparse_linear_names

__all__ = ["DEFAULT_SLORB_GROUP", "group_sum", "group_sum_matrix", "slorb_init", "SLoRB", "slorb_dense_equivalent",
           "slorb_tensors", "attach_slorb", "slorb_from_state"]

DEFAULT_SLORB_GROUP = 16


def _check_k(in_features: int, k: int, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"SLoRB group size k for {name}: expected a positive integer, got {k!r}")
    if in_features % k != 0:
        raise FormatError(f"SLoRB for {name}: K={in_features} is not divisible by the group size k={k}")


def group_sum(x: torch.Tensor, k: int = DEFAULT_SLORB_GROUP) -> torch.Tensor:
    """``P·x`` for the fixed ``P``: sums of each group of ``k`` consecutive entries of the last dimension.

    float [..., K] (K % k == 0) -> float [..., K/k].
    """
    _check_k(x.shape[-1], k, "x")
    return slorb_group_sum(x, k)


def group_sum_matrix(in_features: int, k: int = DEFAULT_SLORB_GROUP, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The fixed ``P``: float [K/k, K], ``P[g, j] = 1`` iff ``j // k == g``."""
    _check_k(in_features, k, "P")
    return torch.repeat_interleave(torch.eye(in_features // k, dtype=dtype, device=device), k, dim=1)


@torch.no_grad()
def slorb_init(weight: torch.Tensor, mask: torch.Tensor, k: int = DEFAULT_SLORB_GROUP,
               name: str = "weight") -> torch.Tensor:
    """Initial ``S``: group means of the pruned weights.

    ``weight`` float [N, K], ``mask`` [N, K] bool or 0/1 (1 = kept) -> float32 [N, K/k] with
    ``S[n, g] = mean_{j in group g} ((1 − M) ⊙ W)[n, j]``.
    """
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise FormatError(f"SLoRB init for {name}: weight {tuple(weight.shape)} and mask {tuple(mask.shape)}"
                          " must both be [N, K]")
    _check_k(weight.shape[1], k, name)
    pruned = weight.detach().float() * (~mask.bool())
    return pruned.reshape(weight.shape[0], -1, k).mean(-1)


class SLoRB(nn.Module):
    """The SLoRB term ``x -> S · (P · x)`` of one layer, added to the sparse layer's output by the caller.

    Parameters: ``S`` float [N, K/k]; ``P`` float [K/k, K] when ``trainable_p`` (else the fixed group sum).
    ``forward(x [..., K]) -> [..., N]``.
    """

    def __init__(self, in_features: int, out_features: int, k: int = DEFAULT_SLORB_GROUP, *,
                 trainable_p: bool = False, name: str = "layer") -> None:
        super().__init__()
        _check_k(in_features, k, name)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.S = nn.Parameter(torch.zeros(out_features, in_features // k))
        self.register_parameter("P", nn.Parameter(group_sum_matrix(in_features, k)) if trainable_p else None)

    @classmethod
    def from_pruned(cls, weight: torch.Tensor, mask: torch.Tensor, k: int = DEFAULT_SLORB_GROUP, *,
                    trainable_p: bool = False, name: str = "layer") -> SLoRB:
        """A SLoRB for the layer with dense ``weight`` [N, K] and ``mask`` [N, K], ``S`` = :func:`slorb_init`."""
        module = cls(weight.shape[1], weight.shape[0], k, trainable_p=trainable_p, name=name)
        with torch.no_grad():
            module.S.copy_(slorb_init(weight, mask, k, name))
        # The layer's dtype too: a float32 S beside a bf16 layer would make F.linear fail outside autocast.
        return module.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)

    @property
    def trainable_p(self) -> bool:
        return self.P is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = group_sum(x, self.k) if self.P is None else F.linear(x, self.P)  # (..., K/k)
        return F.linear(h, self.S)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, " \
               f"trainable_p={self.trainable_p}"


@torch.no_grad()
def slorb_dense_equivalent(slorb: SLoRB) -> torch.Tensor:
    """The dense matrix the SLoRB term equals: float32 [N, K] = ``S · P`` (``x·(S·P)ᵀ == slorb(x)``)."""
    p = slorb.P if slorb.P is not None else group_sum_matrix(slorb.in_features, slorb.k, device=slorb.S.device)
    return (slorb.S.float() @ p.float())


def slorb_tensors(prefix: str, slorb: SLoRB) -> dict[str, torch.Tensor]:
    """Tensors to store for export: ``{prefix}.slorb.S`` float32 [N, K/k] and, when trainable,
    ``{prefix}.slorb.P`` float32 [K/k, K]. The group size is ``K / S.shape[1]``."""
    out = {f"{prefix}.slorb.S": slorb.S.detach().float().contiguous()}
    if slorb.P is not None:
        out[f"{prefix}.slorb.P"] = slorb.P.detach().float().contiguous()
    return out


@torch.no_grad()
def attach_slorb(model: nn.Module, k: int = DEFAULT_SLORB_GROUP, *, names: list[str] | None = None,
                 trainable_p: bool = False) -> dict[str, SLoRB]:
    """Give every :class:`~sparsert.train.sparse_linear.SparseLinear` of ``model`` (or those in ``names``, e.g.
    only the layers trained sparse) a SLoRB term, in place.

    ``S`` of each layer is :func:`slorb_init` of its current dense weight and the mask its forward pass
    applies (the group means of the pruned weights ``(1 − M) ⊙ W``, AST §3.4; ``S = 0`` for a layer in dense
    mode). The module is set as ``layer.slorb`` (state-dict names ``<layer>.slorb.S``, and ``<layer>.slorb.P``
    when ``trainable_p``), which the SparseLinear forward adds to its output. Call it before building the
    optimizer so ``S`` is trained, and again on resume before loading the checkpoint's state dict (which then
    overwrites ``S``). A layer that already has a SLoRB is left as it is. Returns ``{layer name: SLoRB}`` for
    the layers covered.

    ConfigError when the model has no SparseLinear (sparsify it first), a name in ``names`` is not one, or
    ``k`` is not a positive integer;
    FormatError naming the layer when its K is not divisible by ``k``. Only a fixed ``P`` can be compressed
    into an artifact (``trainable_p`` is for experiments).
    """
    from sparsert.train.sparse_linear import SparseLinear  # noqa: PLC0415 - sparse_linear imports nothing back

    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not layers:
        raise ConfigError("SLoRB: the model has no sparse linears (sparsify it before attaching SLoRB)")
    if names is not None:
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise ConfigError(f"SLoRB: '{unknown[0]}' is not a sparse linear (SparseLinear) of the model")
        layers = {n: layers[n] for n in names}
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"SLoRB group size k: expected a positive integer, got {k!r}")
    for name, layer in layers.items():
        _check_k(layer.in_features, k, name)
    out = {}
    for name, layer in layers.items():
        if layer.slorb is None:
            # "Pruned" = what the forward pass drops now: the active (possibly gradual) mask's zeros; nothing in
            # dense mode, where S then starts at 0.
            mask = torch.ones_like(layer.mask) if layer.dense else getattr(layer, "active_mask", layer.mask)
            layer.slorb = SLoRB.from_pruned(layer.weight, mask, k, trainable_p=trainable_p, name=name)
        out[name] = layer.slorb
    return out


def slorb_from_state(state: dict[str, torch.Tensor], config: ModelConfig, where: str = "model state"
                     ) -> tuple[int, list[str]] | None:
    """The SLoRB group size and layers of a model state dict (a checkpoint's), or None when it has none.

    Looks for ``<layer>.slorb.S`` float [out, K/k] of the model's sparse linears; ``k = K / S.shape[1]`` must
    be a whole number and the same for every layer. ArtifactError naming the tensor for a bad shape, mixed
    group sizes, a SLoRB tensor of an unknown layer, or a trainable ``<layer>.slorb.P`` (the artifact format
    stores the fixed group sum only).
    """
    names = sparse_linear_names(config)
    found = {key for key in state if ".slorb." in key}
    layers, k = [], None
    for name in names:
        if f"{name}.slorb.P" in state:
            raise ArtifactError(
                f"{where}: '{name}.slorb.P' is a trained SLoRB projection; the artifact format stores SLoRB "
                "with the fixed group sum only (train with trainable_p=False)"
            )
        s = state.get(f"{name}.slorb.S")
        if s is None:
            continue
        found.discard(f"{name}.slorb.S")
        out, kin = state[f"{name}.weight"].shape
        if s.dim() != 2 or s.shape[0] != out or s.shape[1] == 0 or kin % s.shape[1]:
            raise ArtifactError(
                f"{where}: tensor '{name}.slorb.S' has shape {list(s.shape)}, expected [{out}, K/k] with K={kin}"
            )
        layer_k = kin // s.shape[1]
        if k is not None and layer_k != k:
            raise ArtifactError(
                f"{where}: tensor '{name}.slorb.S' implies SLoRB group size k={layer_k}, but earlier layers use "
                f"k={k} (one group size per model)"
            )
        k = layer_k
        layers.append(name)
    if found:
        raise ArtifactError(f"{where}: tensor '{sorted(found)[0]}' belongs to no sparse linear of the model")
    return None if k is None else (k, layers)
