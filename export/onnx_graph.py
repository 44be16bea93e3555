"""Artifact -> ONNX graph, built by hand with ``onnx.helper`` (opset 21, IR version 10).

The graph is written node by node rather than traced with ``torch.onnx`` so that weight storage is exactly
what deployment needs (see docs/ONNX.md and shared research notes on TensorRT):

- Every linear ``y = x @ W.T (+ b)`` with ``W [N, K]`` (nn.Linear layout) becomes ``MatMul(x, B)`` with
  ``B = W.T`` of shape ``[K, N]``. The artifact's 2:4 groups run along K, i.e. along **axis 0 of B**: for
  every output column, every four consecutive input rows hold at least two zeros — the pattern TensorRT's
  sparse tactics detect (``BuilderFlag.SPARSE_WEIGHTS``) by inspecting the weight values.
- fp32 2:4 layers: ``B`` is a dense float32 initializer carrying the zeros.
- INT4 layers: ``B`` is an INT4 (``TensorProto.INT4`` = 22) initializer ``[K, N]`` holding the codes of the
  kept values and code 0 at pruned positions, packed two per byte (flattened row-major order, first element
  in the low nibble), plus a float32 scale initializer ``[K/g, N]`` (the artifact's fp16 scales, converted
  exactly) feeding ``DequantizeLinear(axis=0, block_size=g)`` (opset 21 blocked quantization, zero point
  omitted = 0) whose output is ``B``. This is the layout of NVIDIA ModelOpt's INT4 AWQ export and the
  pattern ONNX Runtime fuses into ``com.microsoft.MatMulNBits``.
- Embeddings, norms and ``lm_head`` stay dense float32; biases are float32 ``Add`` s.
- SLoRB (artifacts with ``slorb``; AST, Huang et al. 2025): the layer's output gets
  ``+ MatMul(ReduceSum(Reshape(x, [0, 0, K/k, k]), axes=[-1]), Sᵀ)``, ``Sᵀ`` a dense float32 initializer
  ``<layer>.slorb.S_t`` [K/k, N], kept apart from the 2:4 weight so the latter keeps its pattern.

The math reproduces :mod:`sparsert.runtime.model` (read its docstring): RMSNorm as
``x * 1/sqrt(mean(x*x) + eps) * w``; ``LayerNormalization`` (opset 17+) for GPT-2 style; RoPE in the
``rotate_half`` convention with cos/sin rows ``Gather`` ed from initializers copied from the model's
``rope_cos``/``rope_sin`` buffers; SwiGLU ``down(silu(gate) * up)``; ``Gelu(approximate="tanh")`` (opset 20);
attention ``softmax(q k^T / sqrt(hd) + causal mask) v``.

Graph interface (``with_kv_cache=True``)::

    inputs   input_ids               int64   [batch, seq]
             past_key_{i}            float32 [batch, n_heads, past_seq, head_dim]   i = 0 .. n_layers-1
             past_value_{i}          float32 [batch, n_heads, past_seq, head_dim]
    outputs  logits                  float32 [batch, seq, vocab]
             present_key_{i}         float32 [batch, n_heads, past_seq + seq, head_dim]
             present_value_{i}       float32 [batch, n_heads, past_seq + seq, head_dim]

Positions are ``past_seq .. past_seq + seq - 1`` (derived from the shape of ``past_key_0``); query ``t``
attends to keys ``0 .. past_seq + t``. The first call passes empty pasts (``past_seq = 0``). With
``with_kv_cache=False`` the only input is ``input_ids`` and the only output ``logits``. Positions beyond
``max_seq_len`` are out of range of the position tables, so ``past_seq + seq <= max_seq_len``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import sparsert
from sparsert.export import annotations as ann
from sparsert.runtime.artifact import Artifact
from sparsert.runtime.errors import ExportError
from sparsert.runtime.int4 import pack_int4, unpack_int4
from sparsert.runtime.model import rope_tables, sparse_linear_names
from sparsert.runtime.packed_linear import PackedLinear
from sparsert.runtime.sparse24 import decompress_24

OPSET = 21
IR_VERSION = 10
# Protobuf cannot serialise a message of 2 GiB or more; above this the weights go to an external data file.
_PROTOBUF_LIMIT = 2**31 - 2**20


@dataclass(frozen=True)
class LinearWeight:
    """How one linear's weight is stored in the graph.

    ``kind`` is ``"float"`` (``array`` float32 [K, N]) or ``"int4"`` (``array`` int8 codes [K, N] in [-8, 7],
    ``scales`` float32 [K/group_size, N]). ``sparse`` means the artifact stores it 2:4 along K (= axis 0).
    """

    layer: str
    kind: str
    array: np.ndarray
    bias: np.ndarray | None
    sparse: bool
    scales: np.ndarray | None = None
    group_size: int | None = None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def linear_weight(artifact: Artifact, layer: str) -> LinearWeight:
    """Graph form of ``layer``'s weight: its ``W [N, K]`` transposed to ``B [K, N]`` (see module docstring)."""
    packed: PackedLinear | None = artifact.packed.get(layer)
    if packed is None:
        weight = artifact.dense.get(f"{layer}.weight")
        if weight is None:
            raise ExportError(f"artifact {artifact.path}: no weight for linear '{layer}'")
        bias = artifact.dense.get(f"{layer}.bias")
        return LinearWeight(layer, "float", _np(weight).T.copy(), None if bias is None else _np(bias), False)
    bias = packed.bias if packed.bias is not None else artifact.dense.get(f"{layer}.bias")
    return packed_linear_weight(layer, packed, bias)


def packed_linear_weight(layer: str, packed: PackedLinear, bias: torch.Tensor | None = None) -> LinearWeight:
    """Graph form of a packed linear: ``B [K, N]`` float32 (2:4 zeros in place), or for INT4 the int8 codes
    ``[K, N]`` and float32 scales ``[K/g, N]``.

    INT4 layers keep their codes: the dense code matrix is the kept codes scattered to their 2:4 positions
    (0 elsewhere), so ``codes * repeat(scales, g, axis=0)`` equals ``PackedLinear.to_dense().T`` exactly.
    """
    bias_np = None if bias is None else _np(bias)
    if not packed.quantized:
        return LinearWeight(layer, "float", _np(packed.to_dense()).T.copy(), bias_np, packed.sparse)
    k = packed.in_features
    if packed.sparse:
        kept = unpack_int4(packed.qweight, k // 2).to(torch.float32)  # (N, K/2) kept codes
        codes = decompress_24(kept, packed.indices, k).round().to(torch.int8)  # (N, K), 0 where pruned
    else:
        codes = unpack_int4(packed.qweight, k)  # (N, K)
    scales = packed.scales.to(torch.float32)  # fp16 -> fp32 is exact
    return LinearWeight(
        layer,
        "int4",
        codes.numpy().T.copy(),  # (K, N)
        bias_np,
        packed.sparse,
        scales=scales.numpy().T.copy(),  # (K/g, N)
        group_size=packed.group_size,
    )


def int4_initializer(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """ONNX INT4 initializer from int8 codes in [-8, 7] of any shape: the flattened (row-major) codes packed
    two per byte, first element in the low nibble (an odd count pads the last high nibble with 0)."""
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ExportError(f"initializer {name!r}: INT4 codes must be in [-8, 7]")
    packed = pack_int4(torch.from_numpy(codes.reshape(-1)).clone()).numpy()
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True)


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def add(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        if tensor.name in self._names:
            raise ExportError(f"duplicate tensor name {tensor.name!r} in the ONNX graph")
        self._names.add(tensor.name)
        self.initializers.append(tensor)
        return tensor

    def init(self, name: str, array: np.ndarray) -> str:
        return self.add(numpy_helper.from_array(np.ascontiguousarray(array), name)).name

    def const(self, hint: str, value, dtype=np.float32) -> str:
        return self.init(self.fresh(hint), np.asarray(value, dtype=dtype))

    def op(self, op_type: str, inputs: Sequence[str], hint: str, *, n_out: int = 1, outputs=None, **attrs):
        """Add a node; returns its output name (or the list of names when ``n_out > 1``)."""
        name = self.fresh(f"{hint}/{op_type}")
        outs = list(outputs) if outputs is not None else [f"{name}:{i}" for i in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=name, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs


class _Builder:
    def __init__(self, artifact: Artifact, with_kv_cache: bool) -> None:
        self.artifact = artifact
        self.config = artifact.model_config
        self.kv = with_kv_cache
        self.g = _Graph()
        self.linears: dict[str, LinearWeight] = {}

    # -- dense tensors -------------------------------------------------------------------------------------
    def dense(self, name: str) -> str:
        t = self.artifact.dense.get(name)
        if t is None:
            raise ExportError(f"artifact {self.artifact.path}: missing dense tensor '{name}'")
        return self.g.init(name, _np(t))

    # -- layers --------------------------------------------------------------------------------------------
    def linear(self, layer: str, x: str) -> str:
        """``x [..., K] -> [..., N]``: MatMul with B [K, N] (through a blocked DequantizeLinear for INT4)."""
        g, w = self.g, linear_weight(self.artifact, layer)
        self.linears[layer] = w
        if w.kind == "int4":
            init = g.add(int4_initializer(f"{layer}.weight_q", w.array))  # (K, N) INT4 codes
            scale_name = g.init(f"{layer}.weight_scale", w.scales)  # (K/g, N) float32
            b = g.op("DequantizeLinear", [init.name, scale_name], layer, axis=0, block_size=w.group_size)
        else:
            init = g.add(numpy_helper.from_array(w.array, f"{layer}.weight_t"))  # (K, N) float32
            b, scale_name = init.name, None
        y = g.op("MatMul", [x, b], layer)
        node = g.nodes[-1]
        props = ann.weight_annotations(
            layer,
            pattern="2:4" if w.sparse else None,
            group_size=w.group_size if w.kind == "int4" else None,
            scale=scale_name,
        )
        ann.annotate_weight(node, init, props)
        if w.bias is not None:
            y = g.op("Add", [y, g.init(f"{layer}.bias", w.bias)], layer)
        slorb = self.artifact.slorb
        if slorb is not None and layer in slorb.layers:
            y = g.op("Add", [y, self.slorb_term(layer, x, slorb.k)], layer)
        return y

    def slorb_term(self, layer: str, x: str, k: int) -> str:
        """SLoRB ``groupsum_k(x) @ Sᵀ`` for x [B, T, K]: Reshape [B, T, K/k, k], ReduceSum over the last axis,
        MatMul with ``Sᵀ`` [K/k, N] (annotated with :func:`annotations.slorb_annotations`)."""
        g, hint = self.g, f"{layer}.slorb"
        s = self.artifact.dense.get(f"{layer}.slorb.S")
        if s is None:
            raise ExportError(f"artifact {self.artifact.path}: missing SLoRB tensor '{layer}.slorb.S'")
        groups = s.shape[1]
        shape = g.const(f"{hint}.shape", [0, 0, groups, k], np.int64)
        grouped = g.op("Reshape", [x, shape], hint)  # (B, T, K/k, k)
        sums = g.op("ReduceSum", [grouped, g.const(f"{hint}.axis", [-1], np.int64)], hint, keepdims=0)  # (B, T, K/k)
        init = g.add(numpy_helper.from_array(_np(s).T.copy(), f"{layer}.slorb.S_t"))  # (K/k, N)
        y = g.op("MatMul", [sums, init.name], hint)  # (B, T, N)
        ann.annotate_weight(g.nodes[-1], init, ann.slorb_annotations(layer, k))
        return y

    def norm(self, prefix: str, x: str) -> str:
        g, eps = self.g, self.config.norm_eps
        if self.config.arch == "gpt2":
            scale, bias = self.dense(f"{prefix}.weight"), self.dense(f"{prefix}.bias")
            return g.op("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps)
        # RMSNorm: x * 1/sqrt(mean(x*x, -1) + eps) * weight
        sq = g.op("Mul", [x, x], prefix)
        ms = g.op("ReduceMean", [sq, self.axis_last], prefix, keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const("eps", eps)], prefix)], prefix)], prefix)
        return g.op("Mul", [g.op("Mul", [x, inv], prefix), self.dense(f"{prefix}.weight")], prefix)

    def rope(self, x: str, hint: str) -> str:
        """``x * cos + rotate_half(x) * sin`` on x [B, nh, T, hd]; rotate_half = concat(-x2, x1)."""
        g = self.g
        x1, x2 = g.op("Split", [x], hint, n_out=2, axis=-1, num_outputs=2)
        rot = g.op("Concat", [g.op("Neg", [x2], hint), x1], hint, axis=-1)
        return g.op("Add", [g.op("Mul", [x, self.cos], hint), g.op("Mul", [rot, self.sin], hint)], hint)

    def heads(self, x: str, hint: str) -> str:
        """[B, T, d] -> [B, nh, T, hd]."""
        g = self.g
        y = g.op("Reshape", [x, self.heads_shape], hint)  # (B, T, nh, hd)
        return g.op("Transpose", [y], hint, perm=[0, 2, 1, 3])  # (B, nh, T, hd)

    def attention(self, i: int, h: str) -> str:
        g, c, p = self.g, self.config, f"blocks.{i}.attn"
        q = self.heads(self.linear(f"{p}.q_proj", h), f"{p}.q")
        k = self.heads(self.linear(f"{p}.k_proj", h), f"{p}.k")
        v = self.heads(self.linear(f"{p}.v_proj", h), f"{p}.v")
        if c.arch == "llama":
            q, k = self.rope(q, f"{p}.q_rope"), self.rope(k, f"{p}.k_rope")
        if self.kv:
            k = g.op("Concat", [f"past_key_{i}", k], p, outputs=[f"present_key_{i}"], axis=2)  # (B, nh, S, hd)
            v = g.op("Concat", [f"past_value_{i}", v], p, outputs=[f"present_value_{i}"], axis=2)
        kt = g.op("Transpose", [k], p, perm=[0, 1, 3, 2])  # (B, nh, hd, S)
        scores = g.op("Mul", [g.op("MatMul", [q, kt], p), self.attn_scale], p)  # (B, nh, T, S)
        scores = g.op("Where", [self.mask, self.neg_inf, scores], p)
        probs = g.op("Softmax", [scores], p, axis=-1)
        y = g.op("MatMul", [probs, v], p)  # (B, nh, T, hd)
        y = g.op("Transpose", [y], p, perm=[0, 2, 1, 3])  # (B, T, nh, hd)
        y = g.op("Reshape", [y, self.model_shape], p)  # (B, T, d)
        return self.linear(f"{p}.o_proj", y)

    def mlp(self, i: int, h: str) -> str:
        g, p = self.g, f"blocks.{i}.mlp"
        if self.config.arch == "llama":
            gate = self.linear(f"{p}.gate_proj", h)
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], p)], p)
            act = g.op("Mul", [silu, self.linear(f"{p}.up_proj", h)], p)
        else:
            act = g.op("Gelu", [self.linear(f"{p}.up_proj", h)], p, approximate="tanh")
        return self.linear(f"{p}.down_proj", act)

    # -- whole graph ---------------------------------------------------------------------------------------
    def positions(self) -> None:
        """past_len, positions [T] int64 and the causal mask [T, S] bool (True = masked out)."""
        g = self.g
        seq_len = g.op("Shape", ["input_ids"], "pos", start=1, end=2)  # (1,)
        if self.kv:
            past_len = g.op("Shape", ["past_key_0"], "pos", start=2, end=3)  # (1,)
        else:
            past_len = g.const("zero", [0], np.int64)
        total = g.op("Add", [past_len, seq_len], "pos")
        one = g.const("one", 1, np.int64)
        start, stop = g.op("Squeeze", [past_len], "pos"), g.op("Squeeze", [total], "pos")
        self.pos = g.op("Range", [start, stop, one], "pos")  # (T,) absolute positions
        k_pos = g.op("Range", [g.const("zero", 0, np.int64), stop, one], "pos")  # (S,)
        q_col = g.op("Unsqueeze", [self.pos, g.const("axis1", [1], np.int64)], "pos")  # (T, 1)
        self.mask = g.op("Greater", [k_pos, q_col], "mask")  # (T, S): key after query
        self.neg_inf = g.const("neg_inf", -np.inf)
        if self.config.arch == "llama":
            self.axis_last = g.const("axis_last", [-1], np.int64)
        c = self.config
        self.heads_shape = g.const("heads_shape", [0, 0, c.n_heads, c.head_dim], np.int64)
        self.model_shape = g.const("model_shape", [0, 0, c.d_model], np.int64)
        self.attn_scale = g.const("attn_scale", 1.0 / math.sqrt(c.head_dim))

    def build(self) -> onnx.ModelProto:
        g, c = self.g, self.config
        self.positions()
        x = g.op("Gather", [self.dense("tok_emb.weight"), "input_ids"], "tok_emb", axis=0)  # (B, T, d)
        if c.arch == "gpt2":
            x = g.op("Add", [x, g.op("Gather", [self.dense("pos_emb.weight"), self.pos], "pos_emb", axis=0)],
                     "pos_emb")
        else:
            cos, sin = _rope_tables(self.artifact)
            self.cos = g.op("Gather", [g.init("rope_cos", cos), self.pos], "rope", axis=0)  # (T, hd)
            self.sin = g.op("Gather", [g.init("rope_sin", sin), self.pos], "rope", axis=0)
        for i in range(c.n_layers):
            p = f"blocks.{i}"
            x = g.op("Add", [x, self.attention(i, self.norm(f"{p}.attn_norm", x))], p)
            x = g.op("Add", [x, self.mlp(i, self.norm(f"{p}.mlp_norm", x))], p)
        h = self.norm("norm_f", x)
        head = g.init("lm_head.weight_t", _np(self.artifact.dense["lm_head.weight"]).T.copy())
        g.op("MatMul", [h, head], "lm_head", outputs=["logits"])
        return self.model()

    def model(self) -> onnx.ModelProto:
        c = self.config
        kv_shape = ["batch", c.n_heads, "past_seq", c.head_dim]
        present_shape = ["batch", c.n_heads, "total_seq", c.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])]
        if self.kv:
            for i in range(c.n_layers):
                for kind in ("key", "value"):
                    inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, kv_shape))
                    outputs.append(
                        helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, present_shape)
                    )
        graph = helper.make_graph(self.g.nodes, "sparsert_decoder", inputs, outputs, self.g.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="sparsert",
            producer_version=sparsert.__version__,
            doc_string=f"sparsert {c.arch} decoder exported from {self.artifact.path.name}",
        )
        sparse = any(w.sparse for w in self.linears.values())
        q = self.artifact.quantization
        ann.annotate_model(
            model,
            ann.model_annotations(
                pattern="2:4" if sparse else None,
                quantization="int4" if q is not None else None,
                group_size=q.group_size if q is not None else None,
                model_config=c.to_dict(),
                kv_cache=self.kv,
                slorb_k=self.artifact.slorb.k if self.artifact.slorb is not None else None,
                weights_sha256=ann.artifact_weights_sha256(self.artifact.path),
            ),
        )
        return model


def _rope_tables(artifact: Artifact) -> tuple[np.ndarray, np.ndarray]:
    """The RoPE tables exactly as :class:`DecoderLM` holds them (``rope_cos``/``rope_sin`` buffers)."""
    c = artifact.model_config
    cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
    return _np(cos), _np(sin)


def build_onnx_model(artifact: Artifact, *, with_kv_cache: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``artifact`` in memory (see the module docstring for inputs, outputs and layout).

    Its metadata records ``sparsert.weights_sha256``, the sha256 of ``artifact.path / model.safetensors``
    (hashed once here), which ``generate --onnx`` compares with the artifact it is given."""
    missing = [n for n in sparse_linear_names(artifact.model_config)
               if n not in artifact.packed and f"{n}.weight" not in artifact.dense]
    if missing:
        raise ExportError(f"artifact {artifact.path}: no weight for linear '{missing[0]}'")
    return _Builder(artifact, with_kv_cache).build()


def too_big_for_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` would serialise to protobuf's 2 GiB limit or more. The initializers' bytes are summed
    first: protobuf (upb) refuses even to size a message over 2 GiB (``ByteSize`` raises ``EncodeError``)."""
    if sum(len(t.raw_data) for t in model.graph.initializer) >= _PROTOBUF_LIMIT:
        return True
    try:
        return model.ByteSize() >= _PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError: over 2 GiB
        return True


def _inline_again(model: onnx.ModelProto, base_dir: Path) -> None:
    """Undo an external-data save on the in-memory ``model``: read back the bytes written to ``base_dir`` and mark
    every tensor inline again. After a save that failed half-way, tensors not yet written still hold their bytes;
    one whose bytes were cleared but cannot be read back is left empty (the error being raised says why)."""
    from onnx import external_data_helper  # noqa: PLC0415

    for tensor in external_data_helper._get_all_tensors(model):  # noqa: SLF001 - onnx's own walk over every tensor
        if not external_data_helper.uses_external_data(tensor):
            continue
        if not tensor.raw_data:
            with contextlib.suppress(Exception):
                external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def save_onnx_model(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None,
                    keep_data: bool = True) -> Path:
    """Write ``model`` to ``path`` atomically (temporary directory beside it, then rename).

    ``external_data``: store initializers in ``<name>.data`` beside the model (ONNX external data). ``None``
    (default) does so only when the model would exceed protobuf's 2 GiB limit (:func:`too_big_for_protobuf`).
    ``model`` keeps its initializers' bytes in memory either way, unless ``keep_data`` is False: then an external
    data save leaves them out of ``model`` (for a caller done with its weights: protobuf's arena does not free the
    bytes the save clears, so reading them back would hold the weights twice). With external data the data
    file is moved into place before the model file, so a present ``.onnx`` always has its data.
    """
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output {path} is a directory, expected an .onnx file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = too_big_for_protobuf(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = tmp / path.name
        if external_data:
            location = f"{path.name}.data"
            # save_model(save_as_external_data=True) moves the initializers' bytes out of ``model``; they are read
            # back from the file just written rather than saved from a copy (which would double the memory)
            try:
                onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=location, size_threshold=1024)
            finally:
                if keep_data:
                    _inline_again(model, tmp)
            if (tmp / location).exists():  # absent when every tensor is under the 1 KiB threshold
                os.replace(tmp / location, path.parent / location)
        else:
            onnx.save_model(model, staged)
        os.chmod(staged, 0o644)
        os.replace(staged, path)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_onnx(artifact: Artifact, path: str | Path, *, with_kv_cache: bool = True,
                external_data: bool | None = None) -> onnx.ModelProto:
    """Build the ONNX model of ``artifact`` and write it atomically to ``path``; returns the model.

    No checks are run here: ``sparsert export`` adds ``onnx.checker`` (full check), the annotation verifier
    and the ONNX Runtime parity check (:mod:`sparsert.export.parity`).
    """
    model = build_onnx_model(artifact, with_kv_cache=with_kv_cache)
    save_onnx_model(model, path, external_data=external_data)
    return model
