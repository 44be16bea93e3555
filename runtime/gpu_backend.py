"""Run a compressed artifact on the GPU: ``GpuStepper`` (the Stepper protocol of runtime/generate.py).

The model is the same :class:`~sparsert.runtime.model.DecoderLM` code as the CPU reference, built on the GPU
(float32 outside the GEMMs by default) with every packed linear replaced by a
:class:`~sparsert.runtime.dispatch.SparseLinearGPU`: the 2:4 linears run on our sparse GEMM (mma.sp / wgmma.sp)
or cuSPARSELt, INT4 artifacts on our W4A16 2:4 kernel, whichever the dispatcher measured fastest per token
count and found correct. Embeddings, norms, attention, RoPE and ``lm_head`` are torch CUDA ops; the KV cache
lives on the device. Without a usable GPU the constructor raises DeviceError; ``device="cpu"`` builds the same
model on the CPU instead, its packed linears on the compiled CPU product (:mod:`sparsert.runtime.sparse_cpu`: the
kernels' function on the same packed formats), which is what ``generate --backend runtime`` runs without a GPU.

SLoRB terms (artifacts with ``slorb``; AST, Huang et al. 2025) run as torch ops beside the sparse GEMM: a
packed layer with SLoRB becomes :class:`SLoRBLinearGPU` (``linear(x) + groupsum_k(x) @ Sᵀ``, the term in the
dense dtype); a SLoRB layer stored dense is the reference :class:`~sparsert.runtime.model.SLoRBLinear`.

:meth:`GpuStepper.memory_report` gives the device bytes of the linear weights and their bits per weight
(the issue's target for 2:4+INT4: at most 3.25).
"""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from torch import nn

from sparsert.runtime.device import require_gpu
from sparsert.runtime.dispatch import Dispatcher, SparseLinearGPU, cpu_dispatcher, m_bucket
from sparsert.runtime.errors import ConfigError, DeviceError
from sparsert.runtime.model import check_slorb_k, slorb_term

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class SLoRBLinearGPU(nn.Module):
    """A linear on the device plus its SLoRB term: ``y = linear(x) + groupsum_k(x) @ Sᵀ``.

    ``linear``: the layer's module (a :class:`SparseLinearGPU`); ``s``: float [out, K/k] on the device, in the
    dtype the term is computed in (the model's dense dtype; x is cast to it, the sum comes back in x's dtype).
    """

    def __init__(self, linear: nn.Module, s: torch.Tensor, k: int) -> None:
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features, self.k = s.shape[1] * k, s.shape[0], k
        check_slorb_k(self.in_features, k, "SLoRBLinearGPU")
        self.register_buffer("S", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + slorb_term(x.to(self.S.dtype), self.S, self.k).to(y.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}, S={list(self.S.shape)} {self.S.dtype}"


def build_runtime_model(artifact, device: torch.device, *, dtype: torch.dtype, dense_dtype: torch.dtype,
                        dispatcher: Dispatcher, allow_dense: bool = False, backends=None):
    """The artifact's :class:`DecoderLM` on ``device``: dense tensors in ``dense_dtype``, every packed linear a
    :class:`SparseLinearGPU` (GEMM dtype ``dtype``; ``backends`` default to the dispatcher's candidates).

    No dense copy of a packed weight is allocated: the meta-device model gets placeholders for them first.
    SLoRB terms: a packed layer's is :class:`SLoRBLinearGPU` around its SparseLinearGPU; a dense layer's is
    part of its :class:`~sparsert.runtime.model.SLoRBLinear`.
    """
    from sparsert.runtime.model import DecoderLM, add_slorb, rope_tables

    config = artifact.model_config
    slorb = getattr(artifact, "slorb", None)
    slorb_layers = set(slorb.layers) if slorb is not None else set()
    with torch.device("meta"):
        model = DecoderLM(config)
        if slorb is not None:
            add_slorb(model, [n for n in slorb.layers if n not in artifact.packed], slorb.k)
    for name in artifact.packed:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, torch.nn.Identity())
    model = model.to(dense_dtype).to_empty(device=device)
    packed_slorb = {f"{name}.slorb.S" for name in slorb_layers if name in artifact.packed}
    tensors = {k: (v.to(dense_dtype) if v.is_floating_point() else v) for k, v in artifact.dense.items()
               if k not in packed_slorb}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise DeviceError(f"artifact {artifact.path}: dense tensors do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if config.arch == "llama":  # non-persistent buffers, left uninitialised by to_empty: recompute
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        model.rope_cos = cos.to(device=device, dtype=dense_dtype)
        model.rope_sin = sin.to(device=device, dtype=dense_dtype)
    for name, packed in artifact.packed.items():
        parent_name, _, attr = name.rpartition(".")
        layer = SparseLinearGPU(packed, device=device, dtype=dtype, dispatcher=dispatcher, backends=backends,
                                allow_dense=allow_dense, name=name, source_dtype=dense_dtype)
        if name in slorb_layers:
            s = artifact.dense[f"{name}.slorb.S"].to(device=device, dtype=dense_dtype)
            layer = SLoRBLinearGPU(layer, s, slorb.k)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return model.eval().requires_grad_(False)


class DecodeGraph:
    """One-token decode steps of a :class:`~sparsert.runtime.model.DecoderLM` (any: the runtime's or a plain torch
    one on the GPU) replayed from a CUDA graph: :meth:`DecoderLM.decode_step` is captured at the first
    :meth:`step` into static token / position / logits tensors, on a capture stream of its own (so the
    per-stream split-K counters of the W4A16 decode kernel belong to this graph alone), after one eager warm-up
    on a side stream (kernel loads, launch plans, dispatch decisions, tensor maps). Each step then fills the
    token and position on the stream (no host wait), replays, and advances ``cache.length``."""

    def __init__(self, model: nn.Module, cache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.graph = None
        self.stream = torch.cuda.Stream(device)
        self.token = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None

    def step(self, token: int) -> torch.Tensor:
        """Logits float32 [V] of ``token`` fed at position ``cache.length`` (a copy: the graph's own output is
        overwritten by the next replay)."""
        self.token.fill_(token)
        self.position.fill_(self.cache.length)
        if self.graph is None:
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):  # warm-up; its k/v write is the step's own, repeated by the replay
                self.model.decode_step(self.token, self.position, self.cache)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.logits = self.model.decode_step(self.token, self.position, self.cache)
            self.graph = graph
        self.graph.replay()
        self.cache.length += 1
        return self.logits[0, -1].clone()


class GpuStepper:
    """:class:`~sparsert.runtime.generate.Stepper` over an artifact on the GPU (batch 1, static KV cache).

    Args:
        artifact: a loaded :class:`~sparsert.runtime.artifact.Artifact` or the path of an artifact directory.
        device: CUDA device index, or ``"cpu"``: the runtime's CPU fallback (same model, packed formats and
            GEMM rounding; the linears on the compiled CPU product; no CUDA graph).
        dtype: the sparse GEMMs' activation dtype, ``torch.bfloat16`` (default) or ``torch.float16`` (or their
            names); inputs are rounded to it, accumulation is fp32.
        dense_dtype: dtype of everything else (embeddings, norms, attention, KV cache, ``lm_head``):
            float32 by default, as the CPU reference computes; bf16/fp16 halve that memory.
        allow_dense: let the dispatcher also consider dense cuBLAS copies of the weights (16 bits/weight).
        tune: decide every layer's kernel at load for the token counts decoding and prefill will use, then
            free the formats no decision chose (keeps device memory at the chosen formats).
        dispatcher: share one :class:`Dispatcher` between steppers (default: one per device, cached on disk).
        cuda_graph: run every one-token step after the prompt as one CUDA graph replay
            (:meth:`DecoderLM.decode_step`: fixed shapes, the position on the device), captured at the first such
            step or by :meth:`capture_decode_graph`: no per-layer launch cost on the host. The prompt (prefill)
            runs eagerly.
    Raises:
        DeviceError: no usable GPU (``"GpuStepper needs a GPU: no NVIDIA GPU/driver available ..."``), torch
        without CUDA, or a layer no backend can run.
    """

    def __init__(self, artifact, device: int | str = 0, *, dtype: torch.dtype | str = torch.bfloat16,
                 dense_dtype: torch.dtype = torch.float32, allow_dense: bool = False, tune: bool = True,
                 dispatcher: Dispatcher | None = None, cuda_graph: bool = False):
        on_cpu = device == "cpu"
        if on_cpu:
            if cuda_graph:
                raise ConfigError("GpuStepper: cuda_graph needs a GPU (device='cpu' runs each step eagerly)")
            gpu = None
        else:
            try:
                index = operator.index(device)  # an int, a numpy integer, ...
            except TypeError:
                index = -1
            if isinstance(device, bool) or index < 0:
                raise ConfigError(f"GpuStepper device must be a CUDA device index or 'cpu', got {device!r}")
            device = index
            gpu = require_gpu("GpuStepper")
            if device != 0:
                from sparsert.runtime.device import get_device

                gpu = get_device(device)
            if not torch.cuda.is_available():
                raise DeviceError(f"GpuStepper needs torch built with CUDA; this torch ({torch.__version__}) has none")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError(f"GpuStepper dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"GpuStepper dtype must be bfloat16 or float16, got {dtype}")
        if isinstance(artifact, (str, Path)):
            from sparsert.runtime.artifact import load_artifact

            artifact = load_artifact(artifact)
        self.artifact = artifact
        self.gpu = gpu
        self.device = torch.device("cpu") if on_cpu else torch.device("cuda", gpu.index)
        self.dtype = dtype
        self.dense_dtype = dense_dtype
        self.dispatcher = dispatcher or (cpu_dispatcher() if on_cpu else Dispatcher(gpu.name))
        if not on_cpu:
            torch.cuda.set_device(self.device)
        self.model = build_runtime_model(artifact, self.device, dtype=dtype, dense_dtype=dense_dtype,
                                         dispatcher=self.dispatcher, allow_dense=allow_dense)
        self.config = artifact.model_config
        self.max_seq_len = self.config.max_seq_len
        self.cache = self.model.new_cache(1)
        if not isinstance(cuda_graph, bool):
            raise ConfigError(f"GpuStepper cuda_graph must be true or false, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self._graph = DecodeGraph(self.model, self.cache, self.device) if cuda_graph else None
        if tune:
            self.tune()

    @torch.inference_mode()
    def capture_decode_graph(self) -> None:
        """Capture the decode graph now (``cuda_graph=True``), so the first generated token does not pay for it:
        a dummy step at position 0, then :meth:`reset`. Call it after :meth:`tune` (tuning later is refused)."""
        if self._graph is None:
            raise ConfigError("GpuStepper.capture_decode_graph: this stepper was made without cuda_graph=True")
        if self._graph.graph is None:
            self.reset()
            self._graph.step(0)
            self.reset()

    def sparse_layers(self) -> dict[str, SparseLinearGPU]:
        """Every SparseLinearGPU by its layer name (one inside a :class:`SLoRBLinearGPU` under the wrapper's)."""
        named = dict(self.model.named_modules())
        wrapped = {f"{n}.linear": n for n, m in named.items() if isinstance(m, SLoRBLinearGPU)}
        return {wrapped.get(n, n): m for n, m in named.items() if isinstance(m, SparseLinearGPU)}

    def slorb_nbytes(self) -> int:
        """Device bytes of the SLoRB ``S`` tensors of the packed layers (those :meth:`sparse_layers` lists)."""
        return sum(m.S.numel() * m.S.element_size() for m in self.model.modules() if isinstance(m, SLoRBLinearGPU))

    def tune(self, token_counts=None) -> dict[str, dict[int, str]]:
        """Decide each sparse layer's kernel for the decode step (1 token) and prefill buckets up to
        ``max_seq_len``, then free unchosen formats. Returns {layer: {bucket: backend}}. Refused once the decode
        graph is captured (it holds the addresses of the formats in use)."""
        if self._graph is not None and self._graph.graph is not None:
            raise ConfigError("GpuStepper.tune: the decode graph is already captured; tune before the first decode "
                              "step or capture_decode_graph()")
        if token_counts is None:
            token_counts, m = [], 1
            while m <= m_bucket(self.max_seq_len):
                token_counts.append(m)
                m *= 2
        out = {}
        for name, layer in self.sparse_layers().items():
            out[name] = layer.tune(token_counts)
            layer.drop_unused()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def reset(self) -> None:
        self.cache.reset()

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` after the cached positions; logits float32 [V] (on the GPU) of the last position."""
        ids = list(ids)
        vocab = self.config.vocab_size
        if not ids:
            raise ConfigError("GpuStepper.step: no token ids given")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"GpuStepper.step: token ids must be in 0..{vocab - 1}, got {min(ids)}..{max(ids)}")
        if self.cache.length + len(ids) > self.max_seq_len:
            raise ConfigError(f"GpuStepper.step: {self.cache.length + len(ids)} positions exceed max_seq_len="
                              f"{self.max_seq_len}")
        if self._graph is not None and len(ids) == 1 and self.cache.length > 0:
            return self._graph.step(ids[0])
        x = torch.tensor([ids], dtype=torch.int64, device=self.device)  # (1, T)
        return self.model(x, cache=self.cache)[0, -1].float()  # (V,)

    def memory_report(self) -> dict:
        """Device memory of the sparse linears' weights: bytes, weights, bits per weight, backends held.
        The bytes include the SLoRB ``S`` tensors (also given alone as ``slorb_bytes``)."""
        layers = self.sparse_layers()
        slorb_bytes = self.slorb_nbytes()
        nbytes = sum(layer.weight_nbytes() for layer in layers.values()) + slorb_bytes
        nweights = sum(layer.in_features * layer.out_features for layer in layers.values())
        return {
            "device": self.gpu.name if self.gpu is not None else "cpu",
            "linear_weight_bytes": nbytes,
            "linear_weights": nweights,
            "linear_weight_bits_per_weight": 8.0 * nbytes / max(nweights, 1),
            "slorb_bytes": slorb_bytes,
            "backends": {n: dict(layer.chosen) for n, layer in layers.items()},
            "held_formats": sorted({b for layer in layers.values() for b in layer.states}),
            "torch_allocated_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0,
        }
