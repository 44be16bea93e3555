"""``sparsert export HF_DIR``: the checked ONNX export of a Hugging Face directory sparsert wrote.

The directories of ``sparsert train --model`` (``<run>/hf``) and ``sparsert compress HF_DIR -o OUT`` hold dense
weights carrying the 2:4 zeros, and a ``sparsert.json`` naming the 2:4 layers (with their INT4 group when they
were trained or compressed with INT4). :func:`export_hf_model` exports such a model for TensorRT and ONNX Runtime:

- the graph is traced by ``torch.onnx.export`` (the dynamo exporter, onnxscript; opset 21) from the transformers
  model in float32 on the CPU, with the inputs and outputs of artifact graphs (``input_ids`` and
  ``past_key_<i>`` / ``past_value_<i>`` -> ``logits`` and ``present_*``; :class:`_CachedLogits` loads the pasts into
  a transformers ``DynamicCache``), or logits only (``with_kv_cache=False``; every traceable model);
- each recorded layer's weight is found in the graph by its values (the exporter folds ``W.T`` into a
  constant of its own naming), stored as ``B [K, N]`` feeding the ``MatMul`` / ``Gemm`` directly — the
  ``Transpose`` a ``Gemm(transB=1)`` or ``MatMul(Transpose(W))`` would need is folded in, so the 2:4 groups
  run along axis 0 of the initializer TensorRT inspects — and annotated with the convention of
  :mod:`sparsert.export.annotations` (``sparsert.layer`` = the transformers module name);
- INT4 layers (a ``qat_group_size`` in ``sparsert.json``) become INT4 codes + float32 scales feeding a blocked
  ``DequantizeLinear(axis=0, block_size=g)``, as :mod:`sparsert.export.onnx_graph` writes artifacts; a layer
  whose stored values are not exactly INT4 codes times scales of its group (saved in bf16/fp16) stays float32
  2:4 and the result notes it;
- checks, before the file is renamed into place: ``onnx.checker`` full check, the annotations against the
  weight values, every recorded layer found, and ONNX Runtime logits against transformers' own (fp32
  tolerance; :func:`sparsert.export.parity.compare_logits`) on the parity prompts tokenized with the
  directory's tokenizer (fixed token ids without one).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import inspect
import io
import json
import logging
import re
import shutil
import tempfile
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from sparsert.export import annotations as ann
from sparsert.export.onnx_export import ExportResult, check_output, checked_export
from sparsert.export.onnx_graph import OPSET, LinearWeight, int4_initializer, packed_linear_weight
from sparsert.export.onnx_inspect import constant_b
from sparsert.export.onnx_runner import DEFAULT_ACCURACY_LEVEL, OnnxStepper
from sparsert.export.parity import DEFAULT_PROMPTS, ParityReport, compare_logits, reference_batches
from sparsert.runtime.errors import ArtifactError, ConfigError, ExportError, require_path
from sparsert.runtime.hf_stepper import cache_keyword
from sparsert.runtime.linear_swap import outside_linears_note, weight_nk, weights_outside_linears
from sparsert.runtime.moe_experts import expert_weight, fused_experts_modules, unfuse_experts
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.runtime.packed_linear import pack_linear

SAMPLE_TOKENS = 8  # sequence length of the example input the exporter traces with (both axes stay dynamic)


class ExportNote(UserWarning):
    """Something about an export made for a run (``generate --backend onnx`` without ``--onnx``) worth a line."""


class _Logits(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` of a transformers causal LM, without a cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _CachedLogits(nn.Module):
    """``(input_ids [B, T], past_key_0, past_value_0, ...) -> (logits [B, T, V], present_key_0, present_value_0,
    ...)`` of a transformers causal LM whose cache is a ``DynamicCache`` of ``n_layers`` layers: the past tensors
    ``[B, kv_heads, P, head_dim]`` are loaded into a fresh cache, the new tokens take positions ``P .. P + T - 1``,
    and the cache's tensors after the step come back as the presents."""

    def __init__(self, model: nn.Module, n_layers: int, positions: bool, cache_key: str) -> None:
        super().__init__()
        self.model = model  # the same attribute as _Logits: layers are found by the name scopes "model.<layer>"
        self.n_layers, self.positions, self.cache_key = n_layers, positions, cache_key

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # full layers, also for a model with sliding-window layers: those keep every past token here (the masks
        # the model builds from its config still limit each query to its window), so a past's length is the
        # position of the next token
        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {}
        if self.positions:
            start = past[0].shape[2]
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], dtype=torch.int64).unsqueeze(0) + start
        out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_key: cache}, **kwargs)
        presents = []
        for layer in out[self.cache_key].layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


CacheShapes = list[tuple[tuple[int, int], tuple[int, int]]]  # per layer: (kv_heads, head_dim) of keys, of values


def _cache_shapes(model: nn.Module) -> tuple[CacheShapes | None, str]:
    """The shapes of each layer's cached keys and values after a 2-token step, when the model's cache is one the
    KV-cache graph can hold (a transformers ``DynamicCache`` of full or sliding-window layers, which the graph
    holds as full ones: :class:`_CachedLogits`); else None and why not."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return None, "transformers has no DynamicCache"
    key = cache_keyword(model)
    if key is None:
        return None, "its forward takes no KV cache (neither 'cache' nor 'past_key_values')"
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True)
    except Exception as exc:  # noqa: BLE001 - any failure means no cache the graph can hold; its text is kept
        return None, f"a cached step fails ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    cache = out.get(key) if hasattr(out, "get") else None
    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return None, f"its cache is a {type(cache).__name__}, not a plain transformers DynamicCache"
    shapes = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        kind = type(layer).__name__
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer") or keys is None or values is None:
            return None, (f"layer {i} of its cache is a {kind} (a hybrid cache), not a full or "
                          "sliding-window DynamicLayer")
        shapes.append(((keys.shape[1], keys.shape[3]), (values.shape[1], values.shape[3])))
    return shapes, ""


def layer_key(model: nn.Module, name: str, info: dict,
              record: str | Path = "sparsert.json") -> tuple[tuple[int, ...], str]:
    """The key (shape and sha256 of ``B [K, N]`` float32) by which :func:`place_weights` finds the recorded layer
    ``name`` (``info``: its ``sparsert.json`` entry) in the traced graph. ArtifactError when the model has no such
    linear layer, ExportError when a layer recorded as 2:4 is not: checked before the trace."""
    from sparsert.train.hf_model import served_as_2_4

    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"{record} records layer '{name}', which the model does not have") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArtifactError(f"{record} records layer '{name}', a {type(module).__name__} without a 2-D weight "
                            "(not a linear layer)")
    w = weight_nk(module).detach().float()  # [N, K]
    if served_as_2_4(info) and (w.shape[1] % 4 or not is_nm_sparse(w, 2, 4)):
        raise ExportError(f"layer {name}: sparsert.json records it as 2:4, but its weight is not 2:4 along K")
    return _array_key(w.t())


def graph_weight(name: str, b: np.ndarray, info: dict) -> tuple[LinearWeight, str | None]:
    """The graph form of the recorded layer ``name`` from its traced constant ``b`` (``B [K, N]`` float32, already
    checked by :func:`layer_key`): float32 (2:4 zeros in place) or, with a ``qat_group_size`` in ``info``, INT4 codes
    and scales; and a note when its INT4 values could not be kept (None otherwise)."""
    from sparsert.train.hf_model import served_as_2_4

    float_form = LinearWeight(name, "float", b, None, served_as_2_4(info))
    group = info.get("qat_group_size")
    if not float_form.sparse or group is None:
        return float_form, None
    if b.shape[0] % group:
        return float_form, f"{name}: K={b.shape[0]} is not a multiple of its INT4 group {group}; kept as float32"
    w = torch.from_numpy(np.array(b.T, order="C"))  # [N, K], a writable copy (b may be read-only protobuf data)
    packed = packed_linear_weight(name, pack_linear(w, int4_group_size=group, mask=w != 0))
    dequant = packed.array.astype(np.float32) * np.repeat(packed.scales, group, axis=0)
    if not np.array_equal(dequant, b):
        return float_form, (f"{name}: its values are not exact INT4 codes of group {group} (saved in reduced "
                            "precision?); kept as float32 2:4")
    return packed, None


def expert_layers(model: nn.Module, layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The recorded layers that are experts of the model's fused experts modules
    (:mod:`sparsert.runtime.moe_experts`: ``<module>.<expert>.<param>``) -> their weight ``[out, K]`` (a view of the
    fused parameter). ExportError when one recorded as 2:4 is not 2:4 along K."""
    from sparsert.train.hf_model import served_as_2_4

    found = {}
    for module_name, layout in fused_experts_modules(model).items():
        fused = model.get_submodule(module_name)
        for e in range(layout.num_experts):
            for param in layout.params:
                name = f"{module_name}.{e}.{param}"
                if name not in layers:
                    continue
                w = expert_weight(fused, layout, param, e)
                if served_as_2_4(layers[name]) and (w.shape[1] % 4 or not is_nm_sparse(w, 2, 4)):
                    raise ExportError(f"layer {name}: sparsert.json records it as 2:4, but its weight is not 2:4 "
                                      "along K")
                found[name] = w
    return found


def _unfuse_for_export(model: nn.Module, layers: dict[str, dict], recorded: dict[str, dict],
                       keys: dict[str, tuple[tuple[int, ...], str]], notes: list[str], record: Path) -> None:
    """Turn the model's fused MoE experts into per-expert linear layers for the trace
    (:func:`~sparsert.runtime.moe_experts.unfuse_experts`; traced, each expert takes its routed tokens and
    multiplies them by constant weights), and add the recorded ones to ``recorded`` and ``keys``, so they are
    placed, annotated and INT4-quantized like the other layers. Experts of a layout sparsert does not unfuse stay
    fused, traced through transformers' batched matmuls (its default ``grouped_mm`` has no ONNX function)."""
    unfused = unfuse_experts(model)
    for name in unfused:
        if name in layers:
            recorded[name] = layers[name]
            keys[name] = layer_key(model, name, layers[name], record)
    if unfused:
        notes.append(f"{len(unfused)} MoE expert matrices exported as per-expert MatMuls over the tokens routed to "
                     "each (NonZero, GatherND, ScatterND)")
    if weights_outside_linears(model) and callable(getattr(model, "set_experts_implementation", None)):
        with contextlib.suppress(Exception):
            model.set_experts_implementation("batched_mm")
        notes.append(f"{outside_linears_note(model, min_share=0.0)}; exported through batched matmuls")


def _array_key(array: np.ndarray | torch.Tensor) -> tuple[tuple[int, ...], str]:
    """Shape and sha256 of ``array`` as C-contiguous float32 (one contiguous copy at most, hashed in place)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to(torch.float32).contiguous().numpy()
    return tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).data).hexdigest()


@contextlib.contextmanager
def _dynamic_rope_as_static(model: nn.Module, context: int) -> Iterator[None]:
    """Inside, rotary embeddings of ``rope_type`` "dynamic" (dynamic NTK scaling) run without their frequency
    update, whose data-dependent branch torch.export cannot trace. transformers only changes the frequencies once a
    sequence grows past ``max_seq_len_cached`` (the model's ``max_position_embeddings``), so for every sequence up
    to ``context`` ≤ that length the frequencies the module holds are the ones it would use: the graph is exact
    there, and parity checks it. Modules whose cache is shorter than ``context`` are left as they are."""
    patched = []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        forward = getattr(type(module).forward, "__wrapped__", None)
        if forward is None or not any(isinstance(t, str) and "dynamic" in t for t in kinds):
            continue
        if not context <= getattr(module, "max_seq_len_cached", 0):
            continue
        module.forward = types.MethodType(forward, module)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _trace(model: nn.Module, context: int, cache: CacheShapes | None) -> onnx.ModelProto:
    """The transformers model as an ONNX graph (opset 21), traced by the dynamo exporter: ``input_ids`` ->
    ``logits``, and with ``cache`` (:func:`_cache_shapes`) the ``past_key_<i>`` / ``past_value_<i>`` inputs and
    ``present_*`` outputs of sparsert's artifact graphs."""
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency, checked here for a clear message
    except ImportError:
        raise ExportError("exporting a Hugging Face model traces it with torch.onnx's dynamo exporter, which needs "
                          "onnxscript (pip install onnxscript)") from None
    tokens = min(SAMPLE_TOKENS, context)
    example = torch.zeros(2, tokens, dtype=torch.int64)
    dynamic = torch.export.Dim.DYNAMIC
    if cache is not None:
        past_len = max(1, min(3, context - tokens))
        past = tuple(torch.zeros(2, heads, past_len, dim) for pair in cache for heads, dim in pair)
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        module, args = _CachedLogits(model, len(cache), takes_positions, cache_keyword(model)), (example, past)
        names = [f"{kv}_{i}" for i in range(len(cache)) for kv in ("key", "value")]
        inputs, outputs = ["input_ids"] + [f"past_{n}" for n in names], ["logits"] + [f"present_{n}" for n in names]
        shapes_spec = ({0: dynamic, 1: dynamic}, tuple({0: dynamic, 2: dynamic} for _ in past))
    else:
        module, args = _Logits(model), (example,)
        inputs, outputs, shapes_spec = ["input_ids"], ["logits"], ({0: dynamic, 1: dynamic},)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and similar registration chatter
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with torch.no_grad():  # an eager step first: lazily cached buffers (longrope's frequencies) then hold
                model(input_ids=example, use_cache=False)  # real tensors, not fake ones left by the trace
            with _dynamic_rope_as_static(model, context):
                program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=inputs,
                                            output_names=outputs, dynamic_shapes=shapes_spec)
    except Exception as exc:  # noqa: BLE001 - torch.export and onnxscript raise many types
        raise ExportError(f"torch.onnx could not export the {type(model).__name__}: {_cause(exc)}") from None
    finally:
        quiet.setLevel(level)
    return program.model_proto


def _forget_matched_graphs() -> None:
    """Drop the references onnxscript's pattern matchers keep to the last graph they matched. Its rewrite rules are
    module-level objects, and that graph holds the exported program's tensors, i.e. the traced model's weights,
    until the next export: without this the float32 model stays in memory beside the graph (measured with
    onnxscript 0.7). Only attributes that exist are reset, so another onnxscript version costs nothing but the
    scan (under a second)."""
    try:
        from onnxscript.rewriter import _matcher
    except ImportError:
        return
    kind = getattr(_matcher, "PatternMatcher", None)
    if not isinstance(kind, type):
        return
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        matchers = [obj for obj in gc.get_objects() if isinstance(obj, kind)]
    for obj in matchers:
        for attr in ("_graph", "_current_node", "_match"):
            if attr in vars(obj):
                setattr(obj, attr, None)
    del matchers
    gc.collect()


def _cause(exc: BaseException) -> str:
    """The line of a torch.onnx error that says what failed: the first of its "Exception summary" (``<class
    ...>: message``), else its first line; ANSI colours removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    for line in text.splitlines():
        match = re.match(r"<class '[\w.]+'>: (.+)", line.strip())
        if match:
            return match.group(1)[:400]
    return text.splitlines()[0][:400] if text else type(exc).__name__


_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def bfloat16_arithmetic_in_float32(graph: onnx.GraphProto) -> int:
    """Run the graph's bfloat16 ``Add``/``Sub``/``Mul``/``Div`` nodes (ONNX Runtime's CPU provider has no bfloat16
    kernel for them; Falcon's ALiBi computes its biases so) in float32 between ``Cast`` nodes, in place: the inputs
    are widened exactly, and the one rounding of the float32 result back to bfloat16 is what torch's bfloat16
    arithmetic does, so the values are unchanged. Returns how many nodes were rewritten; nodes whose types the
    graph does not record are left as they are."""
    bf16 = onnx.TensorProto.BFLOAT16
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    rewritten, nodes = 0, []
    for node in graph.node:
        if node.op_type not in _ARITHMETIC or types.get(node.output[0]) != bf16:
            nodes.append(node)
            continue
        inputs = []
        for i, name in enumerate(node.input):
            wide = f"{node.name}__in{i}_f32"
            nodes.append(helper.make_node("Cast", [name], [wide], name=f"{wide}_cast", to=onnx.TensorProto.FLOAT))
            inputs.append(wide)
        result = f"{node.name}__f32"
        del node.input[:]
        node.input.extend(inputs)
        out = node.output[0]
        node.output[0] = result
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [result], [out], name=f"{result}_cast", to=bf16))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _name_scopes(node: onnx.NodeProto) -> set[str]:
    """The module paths torch.onnx records on a node (``pkg.torch.onnx.name_scopes``, a Python list literal)."""
    text = next((e.value for e in node.metadata_props if e.key == "pkg.torch.onnx.name_scopes"), None)
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return set()
    return {s for s in scopes if isinstance(s, str)} if isinstance(scopes, list) else set()


def _store(graph: onnx.GraphProto, node: onnx.NodeProto, w: LinearWeight,
           own: onnx.TensorProto | None = None) -> onnx.NodeProto | None:
    """Make ``w`` the annotated ``B`` of ``node``; returns the DequantizeLinear to put before it (INT4). ``own``: the
    initializer ``node`` reads ``B`` from directly, when nothing else reads it; a float32 weight then keeps it,
    renamed and annotated, instead of a copy (protobuf's arena would not free the replaced one's bytes)."""
    layer, int4 = w.layer, w.kind == "int4"
    props = ann.weight_annotations(layer, pattern="2:4" if w.sparse else None,
                                   group_size=w.group_size if int4 else None,
                                   scale=f"{layer}.weight_scale" if int4 else None)
    dq = None
    if int4:
        init = int4_initializer(f"{layer}.weight_q", w.array)
        scale = numpy_helper.from_array(np.ascontiguousarray(w.scales), f"{layer}.weight_scale")
        dq = helper.make_node("DequantizeLinear", [init.name, scale.name], [f"{layer}.weight_dq"],
                              name=f"{layer}/DequantizeLinear", axis=0, block_size=w.group_size)
        node.input[1] = dq.output[0]
        ann.annotate_weight(node, init, props)
        graph.initializer.extend([init, scale])  # copies: annotated first
    elif own is not None:
        old = own.name
        own.name = node.input[1] = f"{layer}.weight_t"
        for info in graph.value_info:
            if info.name == old:
                info.name = own.name
        ann.annotate_weight(node, own, props)
    else:
        init = numpy_helper.from_array(np.ascontiguousarray(w.array), f"{layer}.weight_t")
        node.input[1] = init.name
        ann.annotate_weight(node, init, props)
        graph.initializer.append(init)
    for attr in node.attribute:
        if node.op_type == "Gemm" and attr.name == "transB":
            attr.i = 0
    return dq


def place_weights(proto: onnx.ModelProto, keys: dict[str, tuple[tuple[int, ...], str]],
                  graph_form: Callable[[str, np.ndarray], LinearWeight]) -> list[str]:
    """Store each layer's weight as the ``B`` of the MatMul / Gemm that multiplies by it, annotated (see the module
    docstring). The node is the one torch.onnx recorded inside the layer's module (its name scopes) whose
    constant equals the weight, else (no scope) the first node with that constant, so layers with equal weights
    keep their own names. ``keys``: each recorded layer's :func:`layer_key`; ``graph_form(layer, B)``: its
    :class:`LinearWeight` from the constant ``B [K, N]`` the graph multiplies by (so the torch model need not be
    held while the graph is: the graph's constant is the weight). Returns notes: a weight also multiplied by other
    nodes, which keep it dense and unannotated. ExportError naming a recorded layer the graph does not multiply
    by."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    candidates = []  # (node, key of its constant B) in graph order
    for node in graph.node:
        found = constant_b(node, inits, producers, through_dequantize=False) if node.op_type in ("MatMul", "Gemm") \
            else None
        if found is not None and found[0].dtype == np.float32:
            candidates.append((node, _array_key(found[0])))
    placed: dict[str, onnx.NodeProto] = {}
    for node, key in candidates:  # pass 1: the layer's own module
        scopes = _name_scopes(node)
        own = [n for n in keys if n not in placed and f"model.{n}" in scopes and keys[n] == key]
        if len(own) == 1:
            placed[own[0]] = node
    taken = {id(node) for node in placed.values()}
    for node, key in candidates:  # pass 2: by value alone
        if id(node) in taken:
            continue
        match = next((n for n in keys if n not in placed and keys[n] == key), None)
        if match is not None:
            placed[match] = node
            taken.add(id(node))
    missing = [name for name in keys if name not in placed]
    if missing:
        raise ExportError(f"layer {missing[0]}: no MatMul/Gemm of the exported graph multiplies by its weight "
                          f"({len(missing)} of {len(keys)} recorded layers not found)")
    notes = []
    placed_keys = {keys[n]: n for n in placed}
    for node, key in candidates:
        if id(node) not in taken and key in placed_keys:
            notes.append(f"{placed_keys[key]}: its weight also feeds {node.op_type} node {node.name!r}, which keeps "
                         "it as a dense float32 constant without annotations")
    before = {}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(name for node in graph.node for attr in node.attribute
                for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)) for name in _names_used(sub))
    uses.update(v.name for v in [*graph.output, *graph.input])  # an initializer listed as an input (IR < 4) too
    for name, node in placed.items():
        # decoded again rather than kept from the candidate pass, which would hold every weight a second time
        b = constant_b(node, inits, producers, through_dequantize=False)[0]
        source = node.input[1]
        own = inits.get(source) if uses[source] == 1 and f"{name}.weight_t" not in inits else None
        if own is not None and (own.data_type != onnx.TensorProto.FLOAT
                                or node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)):
            own = None  # not already B [K, N] float32 as stored
        dq = _store(graph, node, graph_form(name, b), own)
        if dq is not None:
            before[id(node)] = dq
    nodes = []
    for node in graph.node:
        if id(node) in before:
            nodes.append(before[id(node)])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return notes


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of ``graph`` reads, its subgraphs' (If/Loop/Scan bodies) included."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _names_used(sub)
    return used


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers nothing consumes any more (the replaced weights and their Transposes)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | _names_used(graph)
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = outputs | _names_used(graph)
    for i in reversed(range(len(graph.initializer))):  # in place: extending a repeated field copies each tensor
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def hf_weights_sha256(path: str | Path) -> str:
    """sha256 of a Hugging Face directory's weights: its ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names in sorted order (``pytorch_model.bin`` likewise). ExportError when
    there are none."""
    p = Path(path)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (p / single).is_file():
            return ann.files_sha256([p / single])
        if (p / index).is_file():
            try:
                shards = sorted(set(json.loads((p / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ExportError(f"{p / index}: not a valid weights index ({exc})") from None
            return ann.files_sha256([p / shard for shard in shards])
    raise ExportError(f"{p}: no model weights to hash (model.safetensors or pytorch_model.bin)")


def parity_prompt_ids(tokenizer, vocab: int, context: int) -> dict[bytes, list[int]]:  # noqa: ANN001 - HFTokenizer
    """The parity prompts (:data:`~sparsert.export.parity.DEFAULT_PROMPTS`) as token ids of ``tokenizer`` cut to
    ``context``; without a tokenizer, three fixed id sequences below ``vocab``."""
    if tokenizer is None:
        return {f"token ids {i}".encode(): [(7 * j + 3 * i + 1) % vocab for j in range(min(12 + 5 * i, context))]
                for i in range(3)}
    prompts = {}
    for prompt in DEFAULT_PROMPTS:
        ids = tokenizer.encode(prompt.decode("utf-8"))[:context]
        if ids:
            prompts[prompt] = ids
    return prompts


@dataclass
class PromptReference:
    """transformers' logits for every input :func:`~sparsert.export.parity.compare_logits` asks its
    reference for (:func:`~sparsert.export.parity.reference_batches`), computed once so the model can be released
    before the graph is written and run: ``logits(ids)`` (``[B][T]`` ids -> ``[B, T, V]``) looks them up."""

    prompt_ids: dict[bytes, list[int]]
    by_batch: dict[tuple[tuple[int, ...], ...], np.ndarray]  # float32 [B, T, V]: transformers' own precision

    def logits(self, ids: list[list[int]]) -> np.ndarray:
        found = self.by_batch.get(tuple(tuple(row) for row in ids))
        if found is None:
            raise ExportError(f"parity reference: no logits computed for the token ids {[row[:8] for row in ids]}")
        return found.astype(np.float64)


def prompt_reference(model: nn.Module, prompt_ids: dict[bytes, list[int]]) -> PromptReference:
    """:class:`PromptReference` of ``model`` (a transformers causal LM, float32, eval mode) on ``prompt_ids``. Each
    batch runs as given: a prefix's logits need not be the prefix of the logits (longrope switches its frequencies
    with the sequence length)."""
    by_batch = {}
    with torch.inference_mode():
        for batch in reference_batches(prompt_ids):
            logits = model(input_ids=torch.tensor(batch), use_cache=False).logits
            by_batch[tuple(tuple(row) for row in batch)] = logits.float().numpy()  # float64 when asked for
    return PromptReference(dict(prompt_ids), by_batch)


def export_hf_model(path: str | Path, output: str | Path, *, with_kv_cache: bool | None = True, parity: bool = True,
                    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL) -> tuple[ExportResult, list[str]]:
    """Export the Hugging Face directory ``path`` (one sparsert wrote: it has ``sparsert.json``) to the ONNX file
    ``output`` with every check (see the module docstring); nothing is left at ``output`` on failure.

    ``with_kv_cache``: the graph with ``past_*`` / ``present_*`` tensors (ExportError for a model whose cache it
    cannot hold), logits only (False), or whichever the model allows (None). Returns the :class:`ExportResult`
    and notes (INT4 layers kept as float32). Raises ConfigError for a plain
    transformers directory (prune it with ``sparsert compress`` first), ArtifactError for unreadable weights,
    ExportError for a refused output path, a model the exporter cannot trace, or a failed check.
    """
    from sparsert.train.hf_model import (
        SPARSERT_FILE,
        has_tokenizer_files,
        load_hf_causal_lm,
        saved_sparse_layers,
        served_as_2_4,
    )
    from sparsert.train.hf_train import hf_model_config

    require_path(output, "-o", "the path of an .onnx file", ExportError)
    out = Path(output)
    check_output(out, path)
    layers = saved_sparse_layers(path)
    if layers is None:
        raise ConfigError(f"{path} is a Hugging Face model directory without {SPARSERT_FILE}: it records no 2:4 "
                          f"layers; prune it first with: sparsert compress {path} -o OUT")
    context = hf_model_config(path).max_seq_len
    bundle = load_hf_causal_lm(path, load_tokenizer=has_tokenizer_files(path))
    model, tokenizer = bundle.model.float().eval(), bundle.tokenizer
    del bundle  # the model is dropped once traced (see build): nothing else may hold it
    notes: list[str] = []
    experts = set(expert_layers(model, layers))  # checked now; names only: the weights are views of the fused tensors
    recorded = {name: info for name, info in layers.items() if name not in experts}
    record = Path(path) / SPARSERT_FILE
    keys = {name: layer_key(model, name, info, record) for name, info in recorded.items()}  # checked before the trace
    sparse = any(served_as_2_4(info) for info in recorded.values())
    if not sparse:
        notes.append(f"{path}: {SPARSERT_FILE} records no 2:4 layer; the graph holds dense weights only")
    cache = None
    if with_kv_cache is not False:
        cache, why = _cache_shapes(model)
        if cache is None and with_kv_cache:
            raise ExportError(f"the {type(model).__name__} has no KV cache the KV-cache graph can hold: {why}; export "
                              "it with --no-kv-cache")
        if cache is None:
            notes.append(f"the graph has no KV cache ({why}): each generated token reruns the whole sequence")
    with_kv_cache = cache is not None
    model_type = str(model.config.model_type)
    reference = None
    if parity:  # transformers' logits now, so the model can go before the graph is written and run
        vocab = model.get_output_embeddings().weight.shape[0]
        reference = prompt_reference(model, parity_prompt_ids(tokenizer, vocab, context))
    _unfuse_for_export(model, layers, recorded, keys, notes, record)  # after the reference: transformers' own experts
    held = [model]
    del model
    groups: set[int] = set()

    def graph_form(name: str, b: np.ndarray) -> LinearWeight:
        w, note = graph_weight(name, b, recorded[name])
        if note is not None:
            notes.append(note)
        if w.kind == "int4":
            groups.add(w.group_size)
        return w

    def build() -> onnx.ModelProto:
        proto = _trace(held.pop(), context, cache)
        _forget_matched_graphs()  # the model goes now: place_weights reads the graph's constants
        bfloat16_arithmetic_in_float32(proto.graph)
        notes.extend(place_weights(proto, keys, graph_form))
        props = ann.model_annotations(pattern="2:4" if sparse else None,
                                      quantization="int4" if groups else None,
                                      group_size=next(iter(groups)) if len(groups) == 1 else None,
                                      model_config=None, kv_cache=with_kv_cache)
        ann.annotate_model(proto, {**props, ann.KEY_HF_MODEL_TYPE: model_type,
                                   ann.KEY_WEIGHTS_SHA256: hf_weights_sha256(path)})
        return proto

    def check_parity(staged: Path) -> ParityReport | None:
        if reference is None:
            return None
        return compare_logits(staged, reference.logits, reference.prompt_ids, quantized=bool(groups),
                              accuracy_level=accuracy_level)

    return checked_export(out, build, ann.verify_sparsity_annotations, check_parity, kv_cache=with_kv_cache), notes


@contextlib.contextmanager
def hf_onnx_stepper(path: str | Path, onnx_path: str | Path | None = None, *, max_seq_len: int,
                    vocab_size: int) -> Iterator[OnnxStepper]:
    """An :class:`~sparsert.export.onnx_runner.OnnxStepper` for the Hugging Face directory ``path``: on
    ``onnx_path``, which must be ``sparsert export``'s graph of this very directory (its ``sparsert.hf_model_type``
    and ``sparsert.weights_sha256`` = :func:`hf_weights_sha256`; ExportError naming both paths otherwise), or
    without it on one exported to a temporary directory (no parity check; with the KV cache when the model's cache
    allows, else logits only, rerun on the whole sequence each step), removed on exit. ``max_seq_len``: the
    model's context; ``vocab_size``: the tokenizer's size."""
    if onnx_path is not None:
        require_path(onnx_path, "--onnx", "the path of an .onnx file", ExportError)
        stepper = OnnxStepper(onnx_path, max_seq_len=max_seq_len, vocab_size=vocab_size)
        if ann.KEY_HF_MODEL_TYPE not in stepper.metadata:
            raise ExportError(f"--onnx {onnx_path} is the export of a sparsert artifact, not of the Hugging Face "
                              f"directory {path}: export that with `sparsert export {path} -o FILE`")
        recorded, actual = stepper.metadata.get(ann.KEY_WEIGHTS_SHA256), hf_weights_sha256(path)
        if recorded != actual:
            was = "has no weights digest" if recorded is None else f"holds other weights (digest {recorded[:16]})"
            raise ExportError(f"--onnx {onnx_path} {was}, not those of {path} (digest {actual[:16]}): export the "
                              f"directory with `sparsert export {path} -o FILE` and pass --onnx FILE")
        yield stepper
        return
    tmp = Path(tempfile.mkdtemp(prefix="sparsert-generate-"))
    try:
        _, notes = export_hf_model(path, tmp / "model.onnx", with_kv_cache=None, parity=False)
        for note in notes:
            warnings.warn(ExportNote(note), stacklevel=3)
        yield OnnxStepper(tmp / "model.onnx", max_seq_len=max_seq_len, vocab_size=vocab_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
