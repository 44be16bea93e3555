"""GPU runtime: device discovery, memory pool, zero-copy exchange, utility kernels, GpuStepper.

CPU tests (always): the torch fallbacks against their references, argument checks before launch, and the
no-GPU / unsupported-GPU paths. GPU tests (``@pytest.mark.gpu``): the same functions through the CUDA kernels
on fresh random inputs with poisoned outputs, the memory pool, DLPack/CAI exchange and GpuStepper vs
TorchStepper.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsert.runtime import device as dev
from sparsert.runtime.errors import ConfigError, DeviceError, FormatError
from sparsert.runtime.kernels import (
    decompress24_reference,
    prune24_compress,
    prune24_decompress,
    prune24_reference,
    transposable_mask,
)
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.sparse_meta import decode_meta_isa, unreorder_meta
from sparsert.runtime.transposable_mask import (
    TRANSPOSABLE_PATTERNS_24,
    is_transposable_24,
    transposable_24_mask,
    transposable_24_mask_reference,
)

gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------------------
# CPU: fallbacks and references
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prune24_fallback_matches_definition(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=gen).to(dtype)
    w[0, :4] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # a tie: keeps the lower columns 0 and 1
    values, meta = prune24_compress(w)
    mask = nm_mask(w)
    assert values.dtype == dtype and values.shape == (32, 64)
    assert meta.dtype == torch.int32 and meta.shape == (2, 2, 32)
    assert torch.equal(prune24_decompress(values, meta, 128), torch.where(mask, w, torch.zeros((), dtype=dtype)))
    assert torch.equal(decode_meta_isa(meta, 32, 128), unreorder_meta(meta, 32, 128))
    assert unreorder_meta(meta, 32, 128)[0, :2].tolist() == [0, 1]
    kept = w.float().abs().reshape(32, 32, 4).topk(2, dim=-1).values.sum()
    assert torch.isclose(values.float().abs().sum(), kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prune_to_sparse24_weight_matches_prepare(dtype):
    from sparsert.runtime.kernels import prune_to_sparse24_weight
    from sparsert.runtime.sparse_gemm import prepare_sparse24_dense

    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = torch.randn(200)
    got = prune_to_sparse24_weight(w, bias)
    ref = prepare_sparse24_dense(torch.where(nm_mask(w), w, torch.zeros((), dtype=dtype)), bias)
    assert got.n_pad == 256 and got.out_features == 200
    assert torch.equal(got.values, ref.values) and torch.equal(got.meta, ref.meta)
    assert torch.equal(got.bias, ref.bias)
    with pytest.raises(FormatError, match="dtype float32, expected one of bfloat16, float16"):
        prune24_compress(w.float(), layout="fragments")
    with pytest.raises(FormatError, match="layout must be one of rows, fragments"):
        prune24_compress(w, layout="columns")


def test_prune24_out_arguments_are_filled():
    w = torch.randn(16, 64)
    out_v = torch.full((16, 32), float("nan"))
    out_m = torch.full((1, 1, 32), -1, dtype=torch.int32)
    values, meta = prune24_compress(w, out_values=out_v, out_meta=out_m)
    assert values is out_v and meta is out_m
    ref_v, ref_m = prune24_reference(w)
    assert torch.equal(out_v, ref_v) and torch.equal(out_m, ref_m)
    out_d = torch.full((16, 64), float("nan"))
    assert prune24_decompress(values, meta, 64, out=out_d) is out_d
    assert torch.equal(out_d, decompress24_reference(ref_v, ref_m, 64))


def _misaligned(shape, dtype):
    big = torch.randn(shape[0] * shape[1] + 1).to(dtype)
    return big[1:].view(shape)


@pytest.mark.parametrize("make,match", [
    (lambda: torch.randn(16, 64).to(torch.int32), "dtype int32, expected one of bfloat16, float16, float32"),
    (lambda: torch.randn(64, 16).t(), "must be contiguous"),
    (lambda: _misaligned((16, 64), torch.float32), "16-byte boundary"),
    (lambda: torch.randn(24, 64), "rows must be a positive multiple of 16"),
    (lambda: torch.randn(16, 96), "K must be a positive multiple of 64"),
    (lambda: torch.randn(16, 64, 1), "must be 2-D"),
    (lambda: [[1.0] * 64] * 16, "must be a torch.Tensor"),
    (lambda: torch.randn(16, 64).index_put_((torch.tensor([3]), torch.tensor([5])), torch.tensor(float("nan"))),
     r"dense holds NaN \(first at row 3, column 5\): it cannot be pruned by magnitude"),
])
def test_prune24_rejects_bad_input_before_launch(make, match):
    with pytest.raises(FormatError, match=match):
        prune24_compress(make())


def test_prune24_rejects_bad_outputs_and_metadata():
    w = torch.randn(16, 64)
    with pytest.raises(FormatError, match=r"out_meta has shape \(1, 2, 32\), expected \(1, 1, 32\)"):
        prune24_compress(w, out_meta=torch.zeros(1, 2, 32, dtype=torch.int32))
    with pytest.raises(FormatError, match="out_values has dtype float16"):
        prune24_compress(w, out_values=torch.zeros(16, 32, dtype=torch.float16))
    values, meta = prune24_compress(w)
    with pytest.raises(FormatError, match=r"meta has dtype int64"):
        prune24_decompress(values, meta.long(), 64)
    with pytest.raises(FormatError, match=r"values has shape \(16, 32\), expected \(16, 64\) for K=128"):
        prune24_decompress(values, meta, 128)
    for bad in (torch.zeros_like(meta), torch.full_like(meta, -1)):  # repeated columns would drop kept values
        with pytest.raises(FormatError, match="meta does not decode to a valid 2:4 pattern: row 0, group 0"):
            prune24_decompress(values, bad, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transposable_mask_fallback(dtype):
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    mask = transposable_mask(w)
    assert mask.dtype == torch.bool and is_transposable_24(mask)
    ref = transposable_24_mask_reference(w)
    assert torch.equal(mask, ref)


@pytest.mark.parametrize("make,match", [
    (lambda: torch.randn(6, 8), "positive multiples of 4"),
    (lambda: torch.randn(8, 8).to(torch.float64), "dtype float64"),
    (lambda: torch.randn(8, 16)[:, ::2], "must be contiguous"),
])
def test_transposable_mask_rejects_bad_input(make, match):
    with pytest.raises(FormatError, match=match):
        transposable_mask(make())


# ---------------------------------------------------------------------------------------------------------
# CPU: no GPU / unsupported GPU / checked calls
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the cached GPU probe and devices for one test (and restore them afterwards)."""
    monkeypatch.setattr(dev, "_PROBE", None)
    monkeypatch.setattr(dev, "_DEVICES", {})
    yield
    dev._PROBE = None


def test_disabled_gpu_gives_clear_error(fresh_probe, monkeypatch):
    monkeypatch.setenv("SPARSERT_DISABLE_GPU", "1")
    assert not dev.gpu_available()
    with pytest.raises(DeviceError, match=r"^no NVIDIA GPU/driver available \(needs sm_80\+\)"):
        dev.get_device()
    from sparsert.runtime.kernel_build import load_kernel
    from sparsert.runtime.kernels import PRUNE24_SPEC

    with pytest.raises(DeviceError, match="no NVIDIA GPU/driver available"):
        load_kernel(PRUNE24_SPEC, "prune24_compress<unsigned short, false>")


def test_no_gpu_here_gives_clear_error(fresh_probe):
    if dev.gpu_available():
        pytest.skip("a GPU is present; the disabled-GPU test covers this path here")
    ok, reason = dev.probe_gpu()
    assert not ok and reason.startswith("no NVIDIA GPU/driver available (needs sm_80+): ")
    with pytest.raises(DeviceError, match=r"no NVIDIA GPU/driver available \(needs sm_80\+\)"):
        dev.get_device(0)


class _FakeDriver:
    """Stands in for cuda.bindings.driver (an external library) to present an sm_75 GPU."""

    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = "major"
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = "minor"

    def cuInit(self, flags):
        return (0,)

    def cuDeviceGetCount(self):
        return (0, 1)

    def cuDeviceGet(self, index):
        return (0, index)

    def cuDeviceGetAttribute(self, attr, device):
        return (0, {"major": 7, "minor": 5}[attr])


def test_pre_ampere_gpu_is_refused(fresh_probe, monkeypatch):
    monkeypatch.delenv("SPARSERT_DISABLE_GPU", raising=False)
    monkeypatch.setattr(dev, "driver", lambda: _FakeDriver())
    assert dev.probe_gpu() == (False, "GPU sm_75 is not supported (needs sm_80 or newer)")
    assert not dev.gpu_available()
    with pytest.raises(DeviceError, match=r"^GPU sm_75 is not supported \(needs sm_80 or newer\)$"):
        dev.get_device(0)


def test_check_cuda_names_call_code_and_error():
    drv = dev.driver()
    with pytest.raises(DeviceError, match=r"^cuMemAlloc failed: CUDA error 2 CUDA_ERROR_OUT_OF_MEMORY"):
        dev.check_cuda((drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY,), "cuMemAlloc")
    assert dev.check_cuda((drv.CUresult.CUDA_SUCCESS, 7), "x") == 7
    assert dev.check_cuda((drv.CUresult.CUDA_SUCCESS,), "x") is None


def test_arch_for_capability():
    assert dev.arch_for_capability((9, 0)) == "sm_90a"
    assert dev.arch_for_capability((8, 6)) == "sm_86"
    assert dev.arch_for_capability((12, 0)) == "sm_120"


def test_from_torch_rejects_cpu_tensor():
    with pytest.raises(DeviceError, match="expects a CUDA tensor, got one on cpu"):
        dev.from_torch(torch.zeros(4))


def test_gpu_stepper_without_gpu_raises_device_error(fresh_probe, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSERT_DISABLE_GPU", "1")
    from sparsert.runtime.gpu_backend import GpuStepper

    with pytest.raises(DeviceError, match=r"GpuStepper needs a GPU: no NVIDIA GPU/driver available"):
        GpuStepper(tmp_path / "no-artifact-needed")


# ---------------------------------------------------------------------------------------------------------
# CPU: dispatch and the runtime model assembly (same code as on the GPU, run by torch on the CPU)
# ---------------------------------------------------------------------------------------------------------

def test_m_bucket_and_key():
    from sparsert.runtime.dispatch import m_bucket, problem_key

    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 2048, 2049)] == [1, 2, 4, 16, 32, 2048, 4096]
    assert problem_key("sparse24", torch.bfloat16, 4096, 11008, 5) == "sparse24|bfloat16|N=4096|K=11008|M=8"
    with pytest.raises(FormatError, match="token count must be a positive int"):
        m_bucket(0)


def test_dispatcher_rejects_wrong_candidates_and_caches(tmp_path):
    from sparsert.runtime.dispatch import Dispatcher

    x, w = torch.randn(8, 64), torch.randn(32, 64)
    ref = x @ w.t()
    cands = {
        "right": lambda: x @ w.t(),
        "wrong": lambda: torch.zeros(8, 32),
        "nan": lambda: torch.full((8, 32), float("nan")),
        "raises": lambda: (_ for _ in ()).throw(RuntimeError("no kernel for this shape")),
    }
    path = tmp_path / "dispatch.json"
    d = Dispatcher("Test GPU", path, warmup=1, reps=2)
    choice = d.choose("k", cands, ref, 1e-4)
    assert choice.name == "right" and set(choice.times_ms) == {"right"}
    assert set(choice.rejected) == {"wrong", "nan", "raises"}
    assert "no kernel for this shape" in choice.rejected["raises"]
    again = Dispatcher("Test GPU", path)
    assert again.lookup("k").name == "right"  # from the JSON file
    assert Dispatcher("Other GPU", path).lookup("k") is None  # another device's file is not used
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format": 1}))  # timed before the L2 was emptied between calls
    assert Dispatcher("Test GPU", path).lookup("k") is None
    path.write_text("{not json")
    assert Dispatcher("Test GPU", path).lookup("k") is None
    with pytest.raises(DeviceError, match="no GEMM backend could run k2: wrong: relative error"):
        Dispatcher("Test GPU", path).choose("k2", {"wrong": cands["wrong"]}, ref, 1e-4)


def test_dispatcher_reports_a_kernel_fault_instead_of_trying_the_next_backend():
    """After an illegal address every CUDA call in the process fails: the fault is raised, naming the
    candidate, not recorded as one more rejected backend (nor absorbed by the dense fallback)."""
    from sparsert.runtime.dispatch import Dispatcher

    x, w = torch.randn(8, 64), torch.randn(32, 64)
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    cands = {"faulty": lambda: (_ for _ in ()).throw(fault), "right": lambda: x @ w.t()}
    with pytest.raises(DeviceError, match="faulty faulted while being measured for k: CUDA error: an illegal"):
        Dispatcher("Test GPU", persist=False).choose("k", cands, x @ w.t(), 1e-4)


def _tiny_artifact(tmp_path, int4: bool, arch: str = "llama", slorb: bool = False):
    from sparsert.runtime.artifact import QuantizationInfo, SLoRBInfo, SparsityInfo, load_artifact, save_artifact
    from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
    from sparsert.runtime.packed_linear import pack_linear
    from sparsert.runtime.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = ModelConfig(arch=arch, d_model=128, n_layers=2, n_heads=4, ffn_dim=384, max_seq_len=64)
    model = DecoderLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # large top-1 margins: greedy decoding robust to bf16 rounding
        for name in sparse_linear_names(model):
            model.get_submodule(name).weight.mul_(5)
    names = sparse_linear_names(model)
    sd = model.state_dict()
    packed = {n: pack_linear(sd[f"{n}.weight"], int4_group_size=128 if int4 else None,
                             bias=sd.get(f"{n}.bias")) for n in names}
    dense = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in packed}
    if slorb:  # SLoRB terms S [out, K/16] on every packed linear (AST's extra parameters)
        for n in names:
            w = sd[f"{n}.weight"]
            dense[f"{n}.slorb.S"] = 0.1 * w.abs().mean() * torch.randn(w.shape[0], w.shape[1] // 16)
    path = tmp_path / f"a-{arch}-{int4}{'-slorb' if slorb else ''}"
    save_artifact(path, model_config=config, tokenizer=ByteTokenizer(), packed=packed,
                  dense=dense, sparsity=SparsityInfo(tuple(names)),
                  quantization=QuantizationInfo(tuple(names), 128) if int4 else None,
                  slorb=SLoRBInfo(16, tuple(names)) if slorb else None)
    return load_artifact(path)


@pytest.mark.parametrize("arch,int4", [("llama", False), ("llama", True), ("gpt2", False)])
def test_runtime_model_assembly_matches_reference_on_cpu(tmp_path, arch, int4):
    from sparsert.runtime.dispatch import DenseCublas, Dispatcher, SparseLinearGPU
    from sparsert.runtime.generate import GenerationConfig, TorchStepper, generate_ids
    from sparsert.runtime.gpu_backend import build_runtime_model

    art = _tiny_artifact(tmp_path, int4, arch)
    ref = art.build_model()
    model = build_runtime_model(art, torch.device("cpu"), dtype=torch.float32, dense_dtype=torch.float32,
                                dispatcher=Dispatcher("cpu", persist=False), backends=[DenseCublas()])
    layers = [m for m in model.modules() if isinstance(m, SparseLinearGPU)]
    assert len(layers) == len(art.packed)
    ids = torch.tensor([list(b"hello sparse world")])
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)
    prompt, cfg = list(b"2:4 "), GenerationConfig(max_new_tokens=8)
    assert generate_ids(TorchStepper(model), prompt, cfg) == generate_ids(TorchStepper(ref), prompt, cfg)


@pytest.mark.parametrize("int4", [False, True])
def test_sparse_linear_dispatch_over_our_backends_on_cpu(int4):
    """The dispatch adapters for sparse_gemm.py (its torch fallbacks here): every variant prepares, runs,
    passes the reference check; one shared prepared state; unused formats are freed."""
    from sparsert.runtime.dispatch import Dispatcher, SparseLinearGPU, our_backends
    from sparsert.runtime.packed_linear import pack_linear

    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))  # 128 rows: no row padding
    packed = pack_linear(w, int4_group_size=128 if int4 else None, bias=torch.randn(128))
    layer = SparseLinearGPU(packed, device="cpu", dtype=torch.bfloat16,
                            dispatcher=Dispatcher("cpu", persist=False, warmup=0, reps=1),
                            backends=our_backends(torch.device("cpu")))
    expected = {"ours_w4a16"} if int4 else {"ours_sparse24"}
    assert set(layer.states) == expected and not set(layer.prepare_errors) & expected
    decided = layer.tune([1, 3, 40])
    assert set(decided) == {1, 4, 64}
    x = torch.randn(2, 3, 256)
    ref = x.to(torch.bfloat16).float() @ packed.to_dense().t() + packed.bias
    y = layer(x)
    assert y.shape == (2, 3, 128) and y.dtype == torch.float32
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    layer.drop_unused()
    assert set(layer.states) == expected and layer._ref_weight is None
    bits = 8 * layer.weight_nbytes() / (128 * 256)
    # the kernels' format: INT4 codes 2 + metadata 1 + fp16 scales 0.125, or bf16 values 8 + metadata 1; on the
    # CPU the host copy of the packed weight is in the same memory and counts too: the same 3.125, or fp32
    # values 16 + indices 1
    assert bits == (3.125 + 3.125 if int4 else 9.0 + 17.0)


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

@gpu
def test_dispatch_offers_the_wgmma_variants_on_hopper_and_they_run():
    """On sm_90a both our 2:4 GEMMs offer their wgmma.sp variants to the dispatcher (sm_80+: mma.sp only), and
    an INT4 layer measured at prefill sizes runs whichever wins within the reference check."""
    from sparsert.runtime.dispatch import Dispatcher, SparseLinearGPU, our_backends
    from sparsert.runtime.packed_linear import pack_linear

    hopper = dev.get_device(0).arch == "sm_90a"
    names = {b.name for b in our_backends(torch.device("cuda", 0))}
    wgmma = {"ours_sparse24_sm90_128", "ours_sparse24_sm90_256", "ours_sparse24_sm90_128_k128",
             "ours_sparse24_sm90_256_k128", "ours_sparse24_sm90tma_128", "ours_sparse24_sm90tma_256",
             "ours_sparse24_sm90tma_128_k128", "ours_sparse24_sm90tma_256_k128", "ours_w4a16_sm90_128",
             "ours_w4a16_sm90_256", "ours_w4a16_sm90tma_128", "ours_w4a16_sm90tma_256"}
    from sparsert.runtime.sparse_gemm import kernel_enabled  # unverified / disabled variants are left out

    wgmma = {n for n in wgmma if kernel_enabled(n.removeprefix("ours_sparse24_").removeprefix("ours_w4a16_"))}
    assert (wgmma <= names) if hopper else not (wgmma & names)
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(8))
    packed = pack_linear(w, int4_group_size=128, bias=torch.randn(512))
    layer = SparseLinearGPU(packed, device="cuda", dtype=torch.bfloat16,
                            dispatcher=Dispatcher(dev.get_device(0).name, persist=False, warmup=1, reps=3),
                            backends=our_backends(torch.device("cuda", 0)))
    decided = layer.tune([1, 256, 2048])
    assert all(name.startswith("ours_w4a16_") for name in decided.values()), decided
    x = torch.randn(2048, 1024, device="cuda")
    ref = x.to(torch.bfloat16).double().cpu() @ packed.to_dense().double().t() + packed.bias.double()
    y = layer(x)
    assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-2


@gpu
def test_memory_pool_statistics():
    d = dev.get_device(0)
    pool = d.pool
    base = pool.stats()
    a = pool.allocate(1 << 20)
    b = pool.allocate(3 << 20)
    s = pool.stats()
    assert s.current_bytes - base.current_bytes == 4 << 20
    assert s.peak_bytes >= base.current_bytes + (4 << 20)
    a.close()
    s2 = pool.stats()
    assert s2.current_bytes - base.current_bytes == 3 << 20 and s2.peak_bytes == s.peak_bytes
    b.close()
    d.sync()
    assert pool.stats().current_bytes == base.current_bytes
    with pytest.raises(DeviceError, match="allocation size must be positive"):
        pool.allocate(0)


@gpu
def test_zero_copy_exchange_round_trip():
    d = dev.get_device(0)
    buf = d.pool.allocate(4 * 64 * 32)
    t = dev.as_torch(buf, (64, 32), torch.float32)
    src = torch.randn(64, 32, device="cuda")
    t.copy_(src)
    assert t.data_ptr() == buf.ptr and torch.equal(t, src)
    half = dev.as_torch(buf, (32, 32), torch.float32, offset=4 * 32 * 32)
    assert torch.equal(half, src[32:])
    view = dev.from_torch(t)
    assert view.ptr == buf.ptr and view.shape == (64, 32) and view.nbytes == 4 * 64 * 32
    with pytest.raises(DeviceError, match="needs 8196 bytes, the buffer has 8192"):
        dev.as_torch(buf, (2049,), torch.float32)
    del t, half, view
    buf.close()
    with pytest.raises(DeviceError, match="freed"):
        dev.as_torch(buf, (1,), torch.float32)


@gpu
def test_workspace_arena():
    arena = dev.WorkspaceArena(1 << 16)
    x = arena.tensor((10, 3), torch.float16)
    y = arena.tensor((100,), torch.float32)
    assert (y.data_ptr() - x.data_ptr()) % 256 == 0 and y.data_ptr() > x.data_ptr()
    x.fill_(1)
    y.fill_(2)
    assert float(x.sum()) == 30 and float(y.sum()) == 200
    with pytest.raises(DeviceError, match="workspace arena of 65536 bytes is full"):
        arena.take(1 << 16)
    arena.reset()
    assert arena.tensor((1,), torch.float32).data_ptr() == x.data_ptr()
    arena.close()


PRUNE_SHAPES = [(16, 64), (48, 192), (128, 1024), (4096, 512)]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", PRUNE_SHAPES)
def test_prune24_kernel_matches_reference(dtype, shape):
    m, k = shape
    for trial in range(2):  # fresh inputs per run
        w = torch.randn(m, k, device="cuda").to(dtype)
        w[: m // 4, :k // 8] = torch.randint(-2, 3, (m // 4, k // 8), device="cuda").to(dtype)  # many ties
        out_v = torch.full((m, k // 2), float("nan"), dtype=dtype, device="cuda")
        out_m = torch.full((m // 16, k // 64, 32), -1, dtype=torch.int32, device="cuda")
        values, meta = prune24_compress(w, out_values=out_v, out_meta=out_m)
        torch.cuda.synchronize()
        ref_v, ref_m = prune24_reference(w.cpu())
        assert torch.equal(meta.cpu(), ref_m), f"metadata differs (trial {trial})"
        assert torch.equal(values.cpu(), ref_v), f"values differ (trial {trial})"
        out_d = torch.full((m, k), float("nan"), dtype=dtype, device="cuda")
        dense = prune24_decompress(values, meta, k, out=out_d)
        torch.cuda.synchronize()
        assert torch.equal(dense.cpu(), decompress24_reference(ref_v, ref_m, k))
        if dtype != torch.float32:
            from sparsert.runtime.sparse_gemm import values_to_fragments

            frag = torch.full((m // 16, k // 64, 2, 32, 8), float("nan"), dtype=dtype, device="cuda")
            out_m.fill_(-1)
            prune24_compress(w, layout="fragments", out_values=frag, out_meta=out_m)
            torch.cuda.synchronize()
            assert torch.equal(frag.cpu(), values_to_fragments(ref_v)) and torch.equal(out_m.cpu(), ref_m)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pruned_weight_feeds_the_sparse_gemm(dtype):
    """prune24 (fragment layout) -> sparse24_linear on the GPU == x @ (W * mask)^T in fp64."""
    from sparsert.runtime.kernels import prune_to_sparse24_weight
    from sparsert.runtime.sparse_gemm import sparse24_linear

    w = torch.randn(384, 512, device="cuda").to(dtype)
    x = torch.randn(37, 512, device="cuda").to(dtype)
    weight = prune_to_sparse24_weight(w)
    y = sparse24_linear(x, weight)
    torch.cuda.synchronize()
    pruned = torch.where(nm_mask(w.cpu()), w.cpu(), torch.zeros((), dtype=dtype)).double()
    ref = x.cpu().double() @ pruned.t()
    err = float((y.cpu().double() - ref).norm() / ref.norm())
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 4), (64, 96), (1024, 1028)])
def test_transposable_mask_kernel_matches_reference(dtype, shape):
    w = torch.randn(*shape, device="cuda").to(dtype)
    out = torch.full(shape, 7, dtype=torch.uint8, device="cuda")
    mask = transposable_mask(w, out=out)
    torch.cuda.synchronize()
    assert set(out.unique().tolist()) <= {0, 1}
    assert is_transposable_24(mask)
    ref = transposable_24_mask_reference(w.cpu())
    a = w.cpu().float().abs()
    blocks = lambda m: (a * m).reshape(shape[0] // 4, 4, shape[1] // 4, 4).sum((1, 3))  # noqa: E731
    got, best = blocks(mask.cpu()), blocks(ref)
    # Both are the argmax: equal kept sums (to float32 rounding); patterns equal except at near-ties.
    assert torch.allclose(got, best, rtol=1e-5, atol=1e-6)
    differ = (mask.cpu() != ref).reshape(shape[0] // 4, 4, shape[1] // 4, 4).any(3).any(1)
    assert int(differ.sum()) <= max(1, differ.numel() // 1000)
    from sparsert.runtime import transposable_mask_cpu

    if transposable_mask_cpu.available():  # the same sums and the same near-tie rule: the same mask
        assert torch.equal(mask.cpu(), transposable_24_mask(w.cpu()))
    assert TRANSPOSABLE_PATTERNS_24.shape == (90, 4, 4)


def _same_rounding_stepper(art):
    """The artifact on the CPU with the GPU stepper's rounding points: bf16 GEMM inputs and outputs, fp32
    accumulation (our kernels' torch fallbacks), everything else fp32."""
    from sparsert.runtime.dispatch import Dispatcher, our_backends
    from sparsert.runtime.generate import TorchStepper
    from sparsert.runtime.gpu_backend import build_runtime_model

    cpu = torch.device("cpu")
    return TorchStepper(build_runtime_model(art, cpu, dtype=torch.bfloat16, dense_dtype=torch.float32,
                                            dispatcher=Dispatcher("cpu", persist=False, warmup=0, reps=1),
                                            backends=our_backends(cpu)))


@pytest.mark.parametrize("int4", [False, True])
def test_slorb_artifact_runs_through_our_kernel_backends_on_cpu(tmp_path, int4):
    """The SLoRB artifact of the GPU test below: on the CPU, our backends' fallbacks (not a dense copy) run its
    layers and match the fp32 model."""
    from sparsert.runtime.dispatch import SparseLinearGPU
    from sparsert.runtime.generate import TorchStepper

    art = _tiny_artifact(tmp_path, int4, slorb=True)
    stepper = _same_rounding_stepper(art)
    layers = [m for m in stepper.model.modules() if isinstance(m, SparseLinearGPU)]
    assert len(layers) == len(art.packed)
    prompt = list(b"The sparse tensor cores ")
    logits = stepper.step(prompt).float()
    for layer in layers:
        assert layer.chosen and all(b.startswith("ours_") for b in layer.chosen.values()), layer.chosen
    fp32 = TorchStepper(art.build_model()).step(prompt).float()
    assert (logits - fp32).norm() / fp32.norm() < 2e-2


@gpu
@pytest.mark.parametrize("int4", [False, True])
def test_gpu_stepper_with_slorb_runs_our_kernels(tmp_path, int4):
    """SLoRB terms around our 2:4 / W4A16 kernels (d = 128: shapes the kernels take, unlike the trained
    SLoRB artifact of test_slorb_e2e, whose layers all fall back to dense cuBLAS)."""
    from sparsert.runtime.generate import GenerationConfig, generate_ids
    from sparsert.runtime.gpu_backend import GpuStepper

    art = _tiny_artifact(tmp_path, int4, slorb=True)
    stepper = GpuStepper(art)
    prompt = list(b"The sparse tensor cores ")
    ref = _same_rounding_stepper(art)
    cfg = GenerationConfig(max_new_tokens=16)
    assert generate_ids(stepper, prompt, cfg) == generate_ids(ref, prompt, cfg)
    backends = {b for layer in stepper.memory_report()["backends"].values() for b in layer.values()}
    assert backends and "dense_cublas" not in backends, backends
    stepper.reset()
    ref.reset()
    logits, want = stepper.step(prompt).float().cpu(), ref.step(prompt).float()
    assert (logits - want).norm() / want.norm() < 1e-2


@gpu
@pytest.mark.parametrize("int4", [False, True])
def test_gpu_stepper_greedy_tokens_match_torch(tmp_path, int4):
    """Greedy tokens equal those of the CPU model with the same rounding points (bf16 GEMM inputs and
    outputs, fp32 accumulation: our kernels' torch fallbacks); the fp32 model is only a logit sanity bound,
    because bf16 GEMMs move logits by more than some of its top-2 gaps (its tokens split at step 18 here)."""
    from sparsert.runtime.generate import GenerationConfig, TorchStepper, generate_ids
    from sparsert.runtime.gpu_backend import GpuStepper

    art = _tiny_artifact(tmp_path, int4)
    ref = _same_rounding_stepper(art)
    stepper = GpuStepper(art)
    assert stepper.max_seq_len == 64
    prompt = list(b"The sparse tensor cores ")
    cfg = GenerationConfig(max_new_tokens=24)
    want = generate_ids(ref, prompt, cfg)
    got = generate_ids(stepper, prompt, cfg)
    assert got == want
    stepper.reset()
    logits = stepper.step(prompt).float().cpu()
    assert logits.shape == (256,)
    ref.reset()
    same_rounding = ref.step(prompt).float()
    assert (logits - same_rounding).norm() / same_rounding.norm() < 1e-2
    fp32 = TorchStepper(art.build_model()).step(prompt).float()
    assert (logits - fp32).norm() / fp32.norm() < 2e-2
    report = stepper.memory_report()
    formats = len(report["held_formats"])  # sparse formats kept after tuning (ours and/or cuSPARSELt)
    assert report["linear_weight_bits_per_weight"] <= (3.25 if int4 else 9.5 * formats), report


@gpu
@pytest.mark.parametrize("int4", [False, True])
def test_gpu_stepper_cuda_graph_decode_matches_eager(tmp_path, int4):
    """cuda_graph=True: the prompt runs eagerly, every later token is one replay of the captured decode step;
    greedy tokens equal the eager stepper's and the same-rounding CPU reference's, also after a reset (the graph
    is reused: static token/position buffers), and the returned logits survive the next replay."""
    from sparsert.runtime.generate import GenerationConfig, generate_ids
    from sparsert.runtime.gpu_backend import GpuStepper

    art = _tiny_artifact(tmp_path, int4)
    prompt = list(b"The sparse tensor cores ")
    cfg = GenerationConfig(max_new_tokens=24)
    want = generate_ids(_same_rounding_stepper(art), prompt, cfg)
    graphed = GpuStepper(art, cuda_graph=True)
    assert generate_ids(graphed, prompt, cfg) == want
    assert graphed._graph.graph is not None  # captured at the first decode token
    with pytest.raises(ConfigError, match="decode graph is already captured"):
        graphed.tune()
    early = GpuStepper(art, cuda_graph=True)
    early.capture_decode_graph()  # a dummy step at position 0, then reset: the cache is clean again
    assert early.cache.length == 0 and generate_ids(early, prompt, cfg) == want
    with pytest.raises(ConfigError, match="made without cuda_graph=True"):
        GpuStepper(art).capture_decode_graph()
    assert generate_ids(graphed, prompt[:-3], cfg) == generate_ids(GpuStepper(art), prompt[:-3], cfg)
    graphed.reset()
    graphed.step(prompt)
    first = graphed.step([int(want[0])])
    kept = first.clone()
    graphed.step([int(want[1])])
    assert torch.equal(first, kept)


@gpu
def test_generate_cli_runtime_backend_matches_torch(tmp_path):
    """`sparsert generate --backend runtime` on the GPU gives the torch reference's greedy tokens."""
    import json
    import os
    import subprocess
    import sys

    art = _tiny_artifact(tmp_path, int4=True)
    outs = {}
    for backend in ("torch", "runtime"):
        proc = subprocess.run([sys.executable, "-m", "sparsert", "generate", str(art.path), "--prompt", "Hello",
                               "--max-new-tokens", "16", "--backend", backend, "--json"],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr
        outs[backend] = json.loads(proc.stdout)
    assert outs["runtime"]["ids"] == outs["torch"]["ids"]
