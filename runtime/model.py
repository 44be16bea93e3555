"""The built-in decoder-only language model: Llama style (default) or GPT-2 style, in plain PyTorch.

A small, readable model in the spirit of nanoGPT (Karpathy) and gpt-fast (PyTorch Labs): a dataclass config,
modules in the order data flows, a static KV cache. The Llama variant follows Touvron et al., "LLaMA: Open
and Efficient Foundation Language Models" (2023): RMSNorm (Zhang & Sennrich 2019), rotary position
embeddings (RoPE, Su et al. 2021) and a SwiGLU MLP (Shazeer 2020). The GPT-2 variant follows Radford et al.
(2019): learned position embeddings, LayerNorm and a GELU MLP.

Module names (the sparse linears are the ``nn.Linear`` submodules inside blocks; everything else stays dense)::

    tok_emb                                   nn.Embedding(V, d)
    pos_emb                                   nn.Embedding(max_seq_len, d)         (gpt2 only)
    blocks.{i}.attn_norm                      RMSNorm(d) | nn.LayerNorm(d)
    blocks.{i}.attn.{q,k,v,o}_proj            nn.Linear(d, d)                      bias: gpt2 only
    blocks.{i}.mlp_norm                       RMSNorm(d) | nn.LayerNorm(d)
    blocks.{i}.mlp.{gate,up}_proj             nn.Linear(d, ffn)                    (gate: llama only)
    blocks.{i}.mlp.down_proj                  nn.Linear(ffn, d)                    bias: gpt2 only
    norm_f                                    RMSNorm(d) | nn.LayerNorm(d)
    lm_head                                   nn.Linear(d, V, bias=False)          untied from tok_emb

Exact math (every op computed in float32; an exporter must reproduce these formulas)::

    x      = tok_emb[ids]                                       [B, T, d]
    x      = x + pos_emb[pos]                                   (gpt2; pos = absolute positions)
    for each block:
        x  = x + o_proj(attention(attn_norm(x)))
        x  = x + mlp(mlp_norm(x))
    logits = lm_head(norm_f(x))                                 [B, T, V]

    RMSNorm(x)   = x * rsqrt(mean(x * x, axis=-1) + eps) * weight          (eps = norm_eps, no bias)
    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (biased variance, eps = norm_eps)
    Linear(x)    = x @ W.T (+ b)                                           (W [out, K], as nn.Linear)

    attention(h):  hd = d / n_heads
        q, k, v = q_proj(h), k_proj(h), v_proj(h), each reshaped [B, T, nh, hd] -> [B, nh, T, hd]
        llama: q, k = rope(q, pos), rope(k, pos)
        scores  = (q @ k^T) * (1 / sqrt(hd))                    [B, nh, T, S]   S = cached + new positions
        scores  = -inf where key position > query position     (causal)
        out     = softmax(scores, axis=-1) @ v                  [B, nh, T, hd] -> [B, T, d]

    rope(x, pos) ("rotate_half" convention of Hugging Face Llama, halves not interleaved pairs):
        inv_freq[j] = 1 / rope_theta ** ((2 * j) / hd)          j = 0 .. hd/2 - 1, float32
        angle[p, j] = p * inv_freq[j];  emb = concat(angle, angle, axis=-1)   [max_seq_len, hd]
        cos, sin    = cos(emb), sin(emb)                        (buffers ``rope_cos``/``rope_sin``)
        rotate_half(x) = concat(-x[..., hd/2:], x[..., :hd/2], axis=-1)
        rope(x, pos)   = x * cos[pos] + rotate_half(x) * sin[pos]

    mlp (llama, SwiGLU): down_proj(silu(gate_proj(h)) * up_proj(h)),  silu(z) = z * sigmoid(z)
    mlp (gpt2):          down_proj(gelu_tanh(up_proj(h))),
                         gelu_tanh(z) = 0.5 * z * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 * z^3)))

The RoPE tables are non-persistent buffers recomputed from the config (not in the state dict); an exporter
should copy ``model.rope_cos`` / ``model.rope_sin`` into the graph rather than recompute them, so the
tables match bit for bit.

Optional SLoRB term (AST, Huang et al. 2025; off by default, switched on per layer by :func:`add_slorb`): the
named block linears become :class:`SLoRBLinear` and compute ::

    Linear(x) = x @ W.T (+ b) + groupsum_k(x) @ S.T        groupsum_k(x)[..., g] = sum(x[..., g*k:(g+1)*k])

with ``S [out, K/k]`` stored as ``<name>.slorb.S`` in the state dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError

ARCHS = ("llama", "gpt2")

_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len")
_FLOAT_FIELDS = ("norm_eps", "rope_theta")


@dataclass
class ModelConfig:
    """Architecture of a :class:`DecoderLM`. Validated on construction (:class:`ConfigError` names the field).

    In the presets every linear input dimension (``d_model``, ``ffn_dim``) is a multiple of 128, so INT4
    group quantization with group size 128 applies to every sparse linear.
    """

    arch: str = "llama"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 384
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ConfigError(f"model config field 'arch': expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"model config field '{name}': expected an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"model config field '{name}': expected a positive integer, got {value}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"model config field '{name}': expected a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model config field '{name}': expected a positive number, got {value}")
            setattr(self, name, float(value))
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"model config field 'd_model': {self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.arch == "llama" and self.head_dim % 2 != 0:
            raise ConfigError(
                f"model config field 'n_heads': head_dim d_model/n_heads = {self.head_dim} must be even for RoPE"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys, wrong types or bad values -> ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"model config: unknown field '{unknown[0]}' (known: {', '.join(f.name for f in fields(cls))})"
            )
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, ffn_dim=384, max_seq_len=256),
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=8, ffn_dim=768, max_seq_len=256),
    "base": ModelConfig(d_model=512, n_layers=8, n_heads=8, ffn_dim=1536, max_seq_len=512),
}


def model_config_from_preset(name: str, arch: str | None = None) -> ModelConfig:
    """A fresh copy of preset ``name`` ("tiny", "small", "base"), optionally with another ``arch``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    d = PRESETS[name].to_dict()
    if arch is not None:
        d["arch"] = arch
    return ModelConfig.from_dict(d)


class KVCache:
    """Static key/value cache for every layer of one :class:`DecoderLM`.

    ``k`` and ``v``: float tensors [n_layers, B, n_heads, max_len, head_dim], preallocated; positions
    ``0 .. length-1`` hold valid entries. :meth:`DecoderLM.forward` writes the new block's keys/values at
    ``length .. length+T-1`` in every layer and then advances ``length`` by T.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k/v [B, nh, T, hd] for ``layer`` at ``length..length+T-1``; return views of all
        positions ``0..length+T-1`` (does not advance ``length``; the model does after the last layer)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class PositionSlot:
    """The :class:`KVCache` seen by one fixed-shape decode step (:meth:`DecoderLM.decode_step`): ``update`` writes
    the token's keys/values [B, nh, 1, hd] at the device-side position ``pos`` (int64 tensor, shape [1]) with
    ``index_copy_`` and returns every cached position [B, nh, max_len, hd] (the step masks those after ``pos``),
    so no shape depends on the position and the step can be captured in a CUDA graph."""

    def __init__(self, cache: KVCache, pos: torch.Tensor) -> None:
        self.cache = cache
        self.pos = pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(2, self.pos, k.to(keys.dtype))
        values.index_copy_(2, self.pos, v.to(values.dtype))
        return keys, values


def slorb_group_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of each group of ``k`` consecutive entries of the last dimension: float [..., K] -> [..., K/k].

    The fixed ``P·x`` of SLoRB (Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive
    Sparse Training", AAAI 2025, §3.4). ``K`` must be a multiple of ``k``.
    """
    if x.shape[-1] % k:
        raise ConfigError(f"SLoRB group sum: K={x.shape[-1]} is not divisible by the group size k={k}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // k, k).sum(-1)  # (..., K/k, k) -> (..., K/k)


def slorb_term(x: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """The SLoRB term ``groupsum_k(x) @ Sᵀ``: x float [..., K], S float [N, K/k] -> [..., N], in x's dtype."""
    return F.linear(slorb_group_sum(x, k), s.to(x.dtype))


class SLoRBTerm(nn.Module):
    """Holds the SLoRB parameter ``S`` float [out, K/k] (initialised to zero: the term starts switched off)
    and computes :func:`slorb_term`. ``forward(x [..., K]) -> [..., out]``."""

    def __init__(self, in_features: int, out_features: int, k: int, *, device=None, dtype=None) -> None:
        super().__init__()
        check_slorb_k(in_features, k, "SLoRB")
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.S = nn.Parameter(torch.zeros(out_features, in_features // k, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slorb_term(x, self.S, self.k)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"


class SLoRBLinear(nn.Linear):
    """``nn.Linear`` plus a SLoRB term: ``y = x @ W.T (+ b) + groupsum_k(x) @ S.T``.

    State dict: ``weight`` [out, K], ``bias`` [out] (if any), ``slorb.S`` [out, K/k].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.slorb = SLoRBTerm(in_features, out_features, k, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.slorb(x)


def check_slorb_k(in_features: int, k: object, name: str) -> None:
    """ConfigError unless ``k`` is a positive integer dividing ``in_features`` (``name`` says which layer)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"SLoRB group size k for {name}: expected a positive integer, got {k!r}")
    if in_features % k:
        raise ConfigError(f"SLoRB for {name}: K={in_features} is not divisible by the group size k={k}")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``x * rsqrt(mean(x^2, -1) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def _make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables, float32 [max_seq_len, head_dim] (frequencies repeated over the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)  # (L, hd/2)
    emb = torch.cat((angles, angles), dim=-1)  # (L, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``concat(-x2, x1)`` for halves x1, x2 of the last dimension (HF Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, T, hd] by cos/sin [T, hd] of its positions."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (each a future sparse linear)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, bias = config.d_model, config.arch == "gpt2"
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.use_rope = config.arch == "llama"
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hd), S = cached + T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` (llama) or ``down(gelu_tanh(up(x)))`` with biases (gpt2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.d_model, config.ffn_dim
        self.gated = config.arch == "llama"
        bias = not self.gated
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = _make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = _make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Decoder-only LM; ``forward(input_ids [B, T] int64, cache=None) -> logits [B, T, V] float32``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.arch == "gpt2":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        else:
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = _make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: weights ~ N(0, 0.02), biases 0, residual output projections (o_proj, down_proj)
        ~ N(0, 0.02 / sqrt(2 * n_layers)); norms at weight 1, bias 0."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty static KV cache for ``batch_size`` sequences of up to ``max_len`` (default max_seq_len)
        positions, on the model's device and in its dtype."""
        c = self.config
        max_len = c.max_seq_len if max_len is None else max_len
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"KV cache batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_len, int) or not 0 < max_len <= c.max_seq_len:
            raise ConfigError(f"KV cache max_len must be in 1..{c.max_seq_len} (max_seq_len), got {max_len!r}")
        w = self.tok_emb.weight
        return KVCache(c.n_layers, batch_size, c.n_heads, max_len, c.head_dim, dtype=w.dtype, device=w.device)

    def _check_input(self, input_ids: torch.Tensor, start: int, cache: KVCache | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ConfigError(f"input_ids: expected an int64 tensor [B, T], got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"input_ids: expected an int64 tensor [B, T], got dtype {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ConfigError("input_ids: the sequence is empty (T = 0)")
        if start + T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {start + T} positions exceeds the model's max_seq_len={self.config.max_seq_len}"
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ConfigError(f"input_ids batch size {B} does not match the KV cache's {cache.batch_size}")
            if start + T > cache.max_len:
                raise ConfigError(f"sequence of {start + T} positions exceeds the KV cache's max_len={cache.max_len}")
        # Value check costs a device sync, so only on CPU and never under tracing/compilation.
        if input_ids.device.type == "cpu" and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ConfigError(f"input_ids: token ids must be in 0..{self.config.vocab_size - 1}, got {lo}..{hi}")

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits float32 [B, T, V] for ``input_ids`` int64 [B, T].

        Without a cache the block starts at position 0 (causal attention within it). With a cache, positions
        continue from ``cache.length``; the new keys/values are appended to the cache, attention covers every
        cached position plus the new block causally, and ``cache.length`` advances by T.
        """
        start = 0 if cache is None else cache.length
        self._check_input(input_ids, start, cache)
        B, T = input_ids.shape
        x = self.tok_emb(input_ids)  # (B, T, d)
        cos = sin = None
        if self.config.arch == "gpt2":
            x = x + self.pos_emb.weight[start:start + T]
        else:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd)
        mask = None
        if cache is not None and T > 1:
            # Query i sits at absolute position start+i and may see keys 0..start+i.
            q_pos = torch.arange(start, start + T, device=x.device)
            k_pos = torch.arange(start + T, device=x.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # (T, S) bool, True = attend
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length = start + T
        return self.lm_head(self.norm_f(x)).float()

    def decode_step(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence at a position held on the device, with shapes independent of it (a CUDA graph
        can capture it once and replay it for every later token): logits float32 [B, 1, V] for ``input_ids``
        int64 [B, 1] at position ``pos`` (int64 tensor [1], on the model's device, < ``cache.max_len``).

        Same function as ``forward(input_ids, cache)`` at ``cache.length == pos``: the keys/values go to ``pos``
        (:class:`PositionSlot`) and attention covers positions ``0..pos`` through a mask over the whole cache
        (the sums then run over more, masked, terms: equal up to float rounding). It neither reads nor advances
        ``cache.length`` and checks nothing on the host (the caller keeps the position in range).
        """
        x = self.tok_emb(input_ids)  # (B, 1, d)
        cos = sin = None
        if self.config.arch == "gpt2":
            x = x + self.pos_emb(pos)  # (1, d)
        else:
            cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)  # (1, hd)
        mask = (torch.arange(cache.max_len, device=pos.device) <= pos).view(1, -1)  # (1, S) bool, True = attend
        slot = PositionSlot(cache, pos)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, slot, i, mask)
        return self.lm_head(self.norm_f(x)).float()


def sparse_linear_names(model: DecoderLM | ModelConfig) -> list[str]:
    """Names of the sparse linears (block attention and MLP projections), block by block in data-flow order:
    ``blocks.{i}.attn.{q,k,v,o}_proj`` then ``blocks.{i}.mlp.{gate,up,down}_proj`` (gpt2: up, down).
    Accepts a model or its config; names stay valid after the linears are swapped for sparse modules."""
    config = model if isinstance(model, ModelConfig) else model.config
    mlp = ("gate_proj", "up_proj", "down_proj") if config.arch == "llama" else ("up_proj", "down_proj")
    names = []
    for i in range(config.n_layers):
        names += [f"blocks.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"blocks.{i}.mlp.{p}" for p in mlp]
    return names


def add_slorb(model: DecoderLM, layers: list[str] | tuple[str, ...], k: int) -> None:
    """Switch the SLoRB term on for the named block linears of ``model``, in place.

    Each ``nn.Linear`` named in ``layers`` (names from :func:`sparse_linear_names`) is replaced by a
    :class:`SLoRBLinear` sharing its ``weight`` and ``bias`` Parameters, with ``S`` = 0 (so the output is
    unchanged until ``S`` is loaded or trained). Works on the meta device. ConfigError for an unknown layer,
    a module that is not an ``nn.Linear``, or a K not divisible by ``k``.
    """
    known = set(sparse_linear_names(model))
    for name in layers:
        if name not in known:
            raise ConfigError(f"SLoRB layer '{name}' is not a sparse linear of this model")
        module = model.get_submodule(name)
        if isinstance(module, SLoRBLinear):
            if module.slorb.k != k:
                raise ConfigError(f"SLoRB layer '{name}' already has group size k={module.slorb.k}, not {k}")
            continue
        if type(module) is not nn.Linear:
            raise ConfigError(f"SLoRB layer '{name}' is a {type(module).__name__}, expected nn.Linear")
        check_slorb_k(module.in_features, k, f"layer '{name}'")
        w = module.weight
        with torch.device("meta"):  # no throw-away copy of the weight
            new = SLoRBLinear(module.in_features, module.out_features, bias=module.bias is not None, k=k)
        new.weight, new.bias = module.weight, module.bias
        new.slorb = SLoRBTerm(module.in_features, module.out_features, k, device=w.device, dtype=w.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)


def slorb_layers(model: nn.Module) -> dict[str, int]:
    """``{layer name: k}`` of every :class:`SLoRBLinear` of ``model``, in module order."""
    return {name: m.slorb.k for name, m in model.named_modules() if isinstance(m, SLoRBLinear)}


def count_parameters(model: nn.Module, *, sparse_linears_only: bool = False) -> int:
    """Number of parameters of ``model``; with ``sparse_linears_only`` the weights (not biases) of the
    linears named by :func:`sparse_linear_names`."""
    if not sparse_linears_only:
        return sum(p.numel() for p in model.parameters())
    return sum(model.get_submodule(name).weight.numel() for name in sparse_linear_names(model))
