"""NVRTC build of every kernel in cuda/ for every target architecture (no GPU needed), and the build cache."""

from __future__ import annotations

import fnmatch
import os
import re
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sparsert.runtime.errors import DeviceError
from sparsert.runtime.kernel_build import (
    KERNEL_ARCHS,
    KernelSpec,
    _read_source,
    all_kernel_specs,
    compile_kernel,
    kernel_dir,
    parse_ptxas_log,
)

SPECS = all_kernel_specs()
# Instructions each sparse GEMM source must emit (the reason the kernel exists), on every arch it builds for.
REQUIRED_PTX = {
    "sparse24_gemm.cu": ("mma.sp",),
    "w4a16_sparse24_gemm.cu": ("mma.sp",),
    "sparse24_gemm_sm90.cu": ("wgmma.mma_async.sp",),
}
CASES = [(key, arch) for key, spec in sorted(SPECS.items()) for arch in KERNEL_ARCHS
         if arch in spec.archs or "sm_80" in spec.archs]


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory) -> Path:
    """One kernel cache for the whole session, filled up front by a thread pool (NVRTC releases the GIL, so
    the (kernel, arch) builds run in parallel on every core); the tests then read their entries from it.
    A build that fails here is simply compiled again, and its error reported, by its own test."""
    cache = tmp_path_factory.mktemp("kernel-cache")

    def build(case):
        key, arch = case
        try:
            compile_kernel(SPECS[key], arch, cache=cache)
        except DeviceError:
            pass

    with ThreadPoolExecutor(max_workers=max(1, min(len(CASES), os.cpu_count() or 1))) as pool:
        # Longest first (the W4A16 units), so the pool does not end on one long build.
        list(pool.map(build, sorted(CASES, key=lambda c: "w4a16" not in c[0])))
    return cache


def test_every_cu_file_is_registered():
    sources = {p.name for p in kernel_dir().glob("*.cu")}
    registered = {spec.source for spec in SPECS.values()}
    assert sources, "no kernels found in cuda/"
    assert sources <= registered, f"kernel files without a KernelSpec: {sorted(sources - registered)}"


@pytest.mark.slow  # the session's parallel build of every kernel for every arch: ~1-3 min on 2 cores
@pytest.mark.parametrize("key,arch", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_kernel_compiles_without_spills(key, arch, build_cache):
    spec = SPECS[key]
    ck = compile_kernel(spec, arch, cache=build_cache)
    assert ck.arch == arch and ck.cubin and f".target {arch}" in ck.ptx
    assert set(ck.lowered_names) == set(spec.name_expressions)
    _, _, log_regs, log_stack = parse_ptxas_log(ck.log, ck.lowered_names)
    for expr in spec.name_expressions:
        # Registers and frame as the cubin holds them (the driver's values); a frame of 0 bytes: no spills.
        assert ck.registers.get(expr, 0) > 0, f"the cubin has no register count for {expr}"
        assert ck.stack_frame.get(expr) == 0, f"{expr} uses {ck.stack_frame.get(expr)} bytes of local memory"
        assert f".entry {ck.lowered_names[expr]}(" in ck.ptx
        if expr not in ck.log_missing:  # ptxas' report, where NVRTC's log has it, says the same
            assert (log_regs[expr], log_stack[expr]) == (ck.registers[expr], 0), ck.log
    assert (ck.spill_stores, ck.spill_loads) == (0, 0), f"{key} spills registers on {arch}:\n{ck.log}"
    for needle in spec.ptx_must_contain + REQUIRED_PTX.get(spec.source, ()):
        assert needle in ck.ptx, f"{spec.source} for {arch}: PTX lacks {needle!r}"


SETMAXNREG_RE = re.compile(r"setmaxnreg\.(dec|inc)\.sync\.aligned\.u32 (\d+);")


@pytest.mark.slow
def test_sm90_register_budget_balances(build_cache):
    """The wgmma kernels hand registers from the producer warpgroup (128 threads, ``setmaxnreg.dec``) to the
    two consumer warpgroups (256 threads, ``setmaxnreg.inc``). ``inc`` blocks until the CTA's pool holds
    the registers (PTX ISA, setmaxnreg), so with R registers per thread at launch the kernel hangs unless
    (R - dec)·128 >= (inc - R)·256; and dec <= R <= inc. ptxas derives R from the launch bounds, so a
    toolchain that picks another R must fail here, not hang on a GPU."""
    counts = {}
    for spec in SPECS.values():
        if spec.source == "sparse24_gemm_sm90.cu":
            counts = {kind: int(n) for kind, n in SETMAXNREG_RE.findall(_read_source(spec.source, kernel_dir())[0])}
            break
    assert set(counts) == {"dec", "inc"}, f"setmaxnreg pair not found in sparse24_gemm_sm90.cu: {counts}"
    dec, inc = counts["dec"], counts["inc"]
    checked = 0
    for spec in SPECS.values():
        if "sm_90a" not in spec.archs or spec.source != "sparse24_gemm_sm90.cu":
            continue
        ck = compile_kernel(spec, "sm_90a", cache=build_cache)
        for expr in spec.name_expressions:
            r = ck.registers[expr]
            assert dec <= r <= inc and (r - dec) * 128 >= (inc - r) * 256, (
                f"{expr}: {r} registers at launch; setmaxnreg.dec {dec} frees {(r - dec) * 128}, "
                f"setmaxnreg.inc {inc} asks {(inc - r) * 256}: the consumers would wait forever")
            checked += 1
    assert checked



def test_wgmma_kernels_are_not_serialized_by_ptxas(build_cache):
    """ptxas keeps consecutive wgmmas in flight only if no other instruction writes their accumulators inside a
    pipeline stage; otherwise it serialises every wgmma of the kernel and says so (C7515, "wgmma.mma_async
    instructions are serialized"). The H200 run of 2026-12-04 measured kernels built that way (a plain
    ``acc = 0.0f``): a performance bug no result check sees."""
    checked = 0
    for spec in SPECS.values():
        if "sm_90a" in spec.archs and "wgmma.mma_async.sp" in spec.ptx_must_contain:
            ck = compile_kernel(spec, "sm_90a", cache=build_cache)
            assert not ck.log_missing, f"no ptxas report for {ck.log_missing} in NVRTC's log: unchecked"
            serialized = [line for line in ck.log.splitlines() if "C7515" in line or "are serialized" in line]
            assert not serialized, "\n".join(serialized)
            checked += 1
    assert checked


@pytest.mark.slow  # reads the session's parallel build (see test_kernel_compiles_without_spills)
@pytest.mark.parametrize("key,arch", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_ptxas_reports_no_performance_loss(key, arch, build_cache):
    """Any other ptxas "Potential Performance Loss" note (e.g. wgmma pipelines crossing a function boundary,
    serialisation for other reasons) is a performance bug no result check sees: none may appear."""
    ck = compile_kernel(SPECS[key], arch, cache=build_cache)
    assert not ck.log_missing, f"NVRTC's log has no ptxas report for {ck.log_missing}, even rebuilt: unchecked"
    notes = [line for line in ck.log.splitlines() if "Performance Loss" in line]
    assert not notes, "\n".join(notes)


def test_sm90_tma_kernels_use_the_copy_engine(build_cache):
    """``sparse24_gemm_sm90_tma`` fills its stages with TMA tensor-map loads and bulk copies completing one
    arrive.expect_tx per stage, after fencing the tensormap proxy for the map the host copied in."""
    from sparsert.runtime.sparse_gemm import SM90_CONFIGS, SM90_SPECS

    assert any(c.tma for c in SM90_CONFIGS)
    ptx = compile_kernel(SM90_SPECS[0], "sm_90a", cache=build_cache).ptx
    for needle in ("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
                   "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
                   "mbarrier.arrive.expect_tx.shared::cta.b64", "fence.proxy.tensormap::generic.acquire.sys",
                   "fence.mbarrier_init.release.cluster", "trap;"):
        assert needle in ptx, needle


def test_sm90_cluster_kernels_multicast_x_and_release_stages_cluster_wide(build_cache):
    """The ``*_tma_mc`` kernels are compiled as 2-CTA clusters (``__cluster_dims__``, so a plain launch forms
    them), multicast their X boxes, release each stage on both CTAs' empty barriers (``mapa`` + remote
    arrive) and synchronise the cluster after initialising the barriers; the other wgmma kernels stay
    single-CTA and never multicast."""
    from sparsert.runtime.sparse_gemm import SM90_CONFIGS, SM90_SPECS, W4A16_SM90_CONFIGS

    assert any(c.cluster == 2 for c in SM90_CONFIGS) and any(c.cluster == 2 for c in W4A16_SM90_CONFIGS)
    ptx = compile_kernel(SM90_SPECS[0], "sm_90a", cache=build_cache).ptx
    entries = re.split(r"\n(?=\.(?:visible|weak) \.entry )", ptx)[1:]
    cluster_entries = [e for e in entries if "_mc" in e.split("(", 1)[0]]
    assert len(cluster_entries) == sum(c.cluster == 2 for c in SM90_CONFIGS) + 2 * sum(
        c.cluster == 2 for c in W4A16_SM90_CONFIGS)
    for e in entries:
        name = e.split("(", 1)[0]
        if e in cluster_entries:
            for needle in (".reqnctapercluster 2, 1, 1", ".multicast::cluster", "mapa.shared::cluster.u32",
                           "mbarrier.arrive.release.cluster.shared::cluster.b64",
                           "barrier.cluster.arrive.release.aligned", "barrier.cluster.wait.acquire.aligned",
                           "mov.u32 %r", "%cluster_ctarank"):
                assert needle in e, f"{name}: {needle}"
        else:
            assert ".reqnctapercluster" not in e and ".multicast::cluster" not in e, name


@pytest.mark.parametrize("kernel", ["sm90_128", "sm90tma_256", "sm90mc_256"])
@pytest.mark.parametrize("diag,has_wgmma", [(1, True), (2, False)])
def test_sm90_diagnostic_builds(diag, has_wgmma, kernel, tmp_path):
    """tools/diagnose_sm90.py rebuilds the wgmma kernels with -DSP24_DIAG: 1 keeps the wgmmas (loads stop
    after the first ring), 2 drops them (loads only). Each must build without spills for sm_90a, keep its
    producer (cp.async, TMA, TMA multicast), and differ from the library build exactly in whether it issues
    wgmma.sp."""
    import dataclasses

    from sparsert.runtime.sparse_gemm import SM90_BY_NAME, SM90_SPECS

    cfg = SM90_BY_NAME[kernel]
    spec = dataclasses.replace(SM90_SPECS[0], name_expressions=(cfg.expr(0),), options=(f"-DSP24_DIAG={diag}",))
    ck = compile_kernel(spec, "sm_90a", cache=tmp_path)
    assert ck.spill_stores == 0 and ck.spill_loads == 0, ck.log
    assert ("wgmma.mma_async.sp" in ck.ptx) == has_wgmma
    producer = ("multicast::cluster" if cfg.cluster > 1 else "cp.async.bulk.tensor" if cfg.tma
                else "cp.async.cg.shared.global")
    assert producer in ck.ptx and "mbarrier.try_wait" in ck.ptx

def test_every_header_is_used_and_shipped():
    """Each cuda/*.cuh is included by a registered kernel (so it is compiled and in that kernel's cache key),
    and pyproject.toml's package data for sparsert.cuda covers every kernel source and header."""
    tomllib = pytest.importorskip("tomllib")
    kdir = kernel_dir()
    headers = {p.name for p in kdir.glob("*.cuh")}
    included = set()
    for spec in SPECS.values():
        included |= set(_read_source(spec.source, kdir)[1])
    assert headers <= included, f"headers no kernel includes: {sorted(headers - included)}"
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["sparsert.cuda"]
    files = {p.name for p in kdir.iterdir() if p.suffix in (".cu", ".cuh")}
    assert files == {name for g in globs for name in files if fnmatch.fnmatch(name, g)}


def test_sparse_gemm_specs_declare_their_instruction():
    """Each sparse GEMM spec names its sparse MMA in ptx_must_contain (so the build check covers it)."""
    for key, spec in SPECS.items():
        for needle in REQUIRED_PTX.get(spec.source, ()):
            assert any(needle in p for p in spec.ptx_must_contain), f"{key} does not require {needle!r} in its PTX"


def test_transposable_table_matches_cpu_reference_order():
    from sparsert.runtime.kernels import transposable_pattern_words

    text = (kernel_dir() / "transposable_mask.cu").read_text()
    table = text[text.index("kPatterns[90] = {"):text.index("};", text.index("kPatterns[90] = {"))]
    words = tuple(int(w, 16) for w in re.findall(r"0x[0-9a-fA-F]{4}", table))
    assert words == transposable_pattern_words()


TINY = textwrap.dedent("""
    extern "C" __global__ void tiny_scale(float* x, float a, int n) {
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) x[i] *= a;
    }
""")


@pytest.fixture
def tiny_kernel(tmp_path) -> tuple[KernelSpec, Path]:
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "tiny.cu").write_text(TINY)
    return KernelSpec("tiny.cu", ("tiny_scale",)), kdir


def test_second_compile_hits_the_cache(tiny_kernel, tmp_path):
    spec, kdir = tiny_kernel
    cache = tmp_path / "cache"
    first = compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    second = compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    assert not first.from_cache and second.from_cache
    assert (second.cubin, second.ptx, second.lowered_names) == (first.cubin, first.ptx, first.lowered_names)
    assert len(list(cache.iterdir())) == 1
    other = compile_kernel(spec, "sm_86", cache=cache, kernel_dir_override=kdir)
    assert not other.from_cache and len(list(cache.iterdir())) == 2
    opts = compile_kernel(KernelSpec("tiny.cu", ("tiny_scale",), ("-DUNUSED=1",)), "sm_80", cache=cache,
                          kernel_dir_override=kdir)
    assert not opts.from_cache and len(list(cache.iterdir())) == 3


def test_source_change_invalidates_the_cache(tiny_kernel, tmp_path):
    spec, kdir = tiny_kernel
    cache = tmp_path / "cache"
    compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    (kdir / "tiny.cu").write_text(TINY + "\n// edited\n")
    assert not compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir).from_cache


def test_included_header_is_part_of_the_key(tmp_path):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "scale.cuh").write_text("#define SCALE 2.0f\n")
    (kdir / "inc.cu").write_text('#include "scale.cuh"\nextern "C" __global__ void k(float* x) { x[0] *= SCALE; }\n')
    spec = KernelSpec("inc.cu", ("k",))
    cache = tmp_path / "cache"
    compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    (kdir / "scale.cuh").write_text("#define SCALE 3.0f\n")
    rebuilt = compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    assert not rebuilt.from_cache and "0f40400000" in rebuilt.ptx  # 3.0f


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "field-type"])
def test_corrupt_cache_entry_is_rebuilt(tiny_kernel, tmp_path, damage):
    spec, kdir = tiny_kernel
    cache = tmp_path / "cache"
    good = compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    (entry,) = cache.iterdir()
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        entry.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "field-type":  # a well-formed, correctly hashed entry whose header field has the wrong type
        import hashlib
        import json
        import struct

        from sparsert.runtime.kernel_build import _MAGIC

        body = data[len(_MAGIC) + 32:]
        (hlen,) = struct.unpack("<I", body[:4])
        meta = json.loads(body[4:4 + hlen])
        meta["ptx_len"] = str(meta["ptx_len"])
        header = json.dumps(meta).encode()
        body = struct.pack("<I", len(header)) + header + body[4 + hlen:]
        entry.write_bytes(_MAGIC + hashlib.sha256(body).digest() + body)
    else:
        entry.write_bytes(b"")
    rebuilt = compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir)
    assert not rebuilt.from_cache and rebuilt.cubin == good.cubin
    assert compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir).from_cache


def test_concurrent_processes_share_the_cache(tiny_kernel, tmp_path):
    spec, kdir = tiny_kernel
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        from sparsert.runtime.kernel_build import KernelSpec, compile_kernel
        for _ in range(3):
            ck = compile_kernel(KernelSpec("tiny.cu", ("tiny_scale",)), "sm_80", cache={str(cache)!r},
                                kernel_dir_override={str(kdir)!r})
            assert ck.cubin and ck.lowered_names == {{"tiny_scale": "tiny_scale"}}
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len([p for p in cache.iterdir() if p.suffix == ".bin"]) == 1
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]
    assert compile_kernel(spec, "sm_80", cache=cache, kernel_dir_override=kdir).from_cache


def test_compile_error_names_kernel_and_shows_log(tmp_path):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "broken.cu").write_text('extern "C" __global__ void broken_kernel(float* x) { x[0] = undefined_thing; }\n')
    with pytest.raises(DeviceError) as info:
        compile_kernel(KernelSpec("broken.cu", ("broken_kernel",)), "sm_80", cache=tmp_path / "c",
                       kernel_dir_override=kdir)
    msg = str(info.value)
    assert "cuda/broken.cu" in msg and "broken_kernel" in msg and "sm_80" in msg
    assert 'identifier "undefined_thing" is undefined' in msg
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_bad_arch_and_missing_source(tiny_kernel, tmp_path):
    spec, kdir = tiny_kernel
    with pytest.raises(DeviceError, match="sm_75"):
        compile_kernel(spec, "sm_75", cache=tmp_path, kernel_dir_override=kdir)
    with pytest.raises(DeviceError, match="not built for sm_80"):
        compile_kernel(KernelSpec("tiny.cu", ("tiny_scale",), archs=("sm_90a",)), "sm_80", cache=tmp_path,
                       kernel_dir_override=kdir)
    with pytest.raises(DeviceError, match="cuda/nothere.cu not found"):
        compile_kernel(KernelSpec("nothere.cu", ("k",)), "sm_80", cache=tmp_path, kernel_dir_override=kdir)
    with pytest.raises(DeviceError, match="want"):
        compile_kernel(spec, "sm_80", want=("sass",), cache=tmp_path, kernel_dir_override=kdir)


def test_parse_ptxas_log():
    log = textwrap.dedent("""
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_Z1fPf' for 'sm_80'
        ptxas info    : Function properties for _Z1fPf
        ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]
        ptxas info    : Compiling entry function 'g' for 'sm_80'
        ptxas info    : Function properties for g
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 12 registers, used 0 barriers
    """)
    stores, loads, regs, stack = parse_ptxas_log(log, {"f": "_Z1fPf", "g": "g"})
    assert (stores, loads) == (8, 4)
    assert regs == {"f": 255, "g": 12} and stack == {"f": 16, "g": 0}


LOCAL_ARRAY = textwrap.dedent("""
    extern "C" __global__ void local_array(float* x, int i) {
      float a[64];
      for (int j = 0; j < 64; ++j) a[j] = x[j];
      a[i & 63] += 1.0f;
      x[0] = a[(i * 7) & 63];
    }
""")


def _cubin_info():
    """sparsert.runtime.cubin_info, or a skip where pyelftools is not installed (the builder then takes the
    registers from ptxas' log, as the other tests here check)."""
    pytest.importorskip("elftools", reason="pyelftools (the cuda extra) reads registers from the cubin")
    from sparsert.runtime import cubin_info

    return cubin_info


def test_registers_and_frame_come_from_the_cubin(tmp_path):
    """The cubin's .nv.info attributes (what the driver loads) agree with ptxas' -v report, for a kernel with
    no local memory and one whose dynamically indexed array lives in a 256-byte stack frame."""
    cubin_info = _cubin_info()
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "two.cu").write_text(TINY + LOCAL_ARRAY)
    ck = compile_kernel(KernelSpec("two.cu", ("tiny_scale", "local_array")), "sm_80", use_cache=False,
                        kernel_dir_override=kdir)
    _, _, log_regs, log_stack = parse_ptxas_log(ck.log, ck.lowered_names)
    assert ck.registers == log_regs and ck.stack_frame == log_stack and not ck.log_missing
    assert ck.stack_frame == {"tiny_scale": 0, "local_array": 256}
    resources = cubin_info.kernel_resources(ck.cubin)
    assert resources["local_array"] == cubin_info.KernelResources(registers=ck.registers["local_array"],
                                                                  frame_bytes=256)


def test_nv_info_records_and_bad_cubins():
    cubin_info = _cubin_info()
    nv_info_records, kernel_resources = cubin_info.nv_info_records, cubin_info.kernel_resources
    data = (bytes([0x04, 0x2F]) + struct.pack("<HII", 8, 3, 40)  # SVAL: size 8, symbol 3, 40 registers
            + bytes([0x03, 0x1B, 0x05, 0x00])  # HVAL: the value in the header's last two bytes
            + bytes([0x01, 0x0A, 0x00, 0x00]))  # NVAL
    assert nv_info_records(data) == [(4, 0x2F, struct.pack("<II", 3, 40)), (3, 0x1B, b"\x05\x00"),
                                     (1, 0x0A, b"\x00\x00")]
    with pytest.raises(DeviceError, match="says 8 payload bytes"):
        nv_info_records(data[:10])
    with pytest.raises(DeviceError, match="record header at byte 0"):
        nv_info_records(b"\x04\x2f")
    with pytest.raises(DeviceError, match="cannot read kernel resources from the cubin"):
        kernel_resources(b"not an elf image at all")


def _corrupt_ptxas_reports(monkeypatch, calls: int | None):
    """Make NVRTC's program log lose every ``Used N registers`` line in its first ``calls`` reads (all when
    None): the shape of the incomplete log NVRTC 13.0 returned on the H200 machine. The log buffer is edited
    in place after the real call, as the binding itself fills it."""
    import ctypes

    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    real = nvrtc.nvrtcGetProgramLog
    seen = []

    def get_log(prog, buf):
        out = real(prog, buf)
        seen.append(1)
        if calls is None or len(seen) <= calls:
            base = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
            for m in re.finditer(rb"Used \d+ registers", bytes(buf)):
                ctypes.memmove(base + m.start(), b"Xsed", 4)
        return out

    monkeypatch.setattr(nvrtc, "nvrtcGetProgramLog", get_log)
    return seen


def test_incomplete_ptxas_log_is_rebuilt_once(tiny_kernel, monkeypatch):
    spec, kdir = tiny_kernel
    seen = _corrupt_ptxas_reports(monkeypatch, calls=1)
    ck = compile_kernel(spec, "sm_80", use_cache=False, kernel_dir_override=kdir)
    assert len(seen) == 2 and not ck.log_missing and "Used " in ck.log
    assert ck.registers["tiny_scale"] > 0 and ck.stack_frame == {"tiny_scale": 0}


def test_registers_survive_a_log_without_reports(tiny_kernel, monkeypatch, tmp_path):
    _cubin_info()
    spec, kdir = tiny_kernel
    expected = compile_kernel(spec, "sm_80", use_cache=False, kernel_dir_override=kdir).registers
    seen = _corrupt_ptxas_reports(monkeypatch, calls=None)
    ck = compile_kernel(spec, "sm_80", cache=tmp_path / "c", kernel_dir_override=kdir)
    assert len(seen) == 2 and ck.log_missing == ("tiny_scale",) and "Used " not in ck.log
    assert ck.registers == expected and ck.stack_frame == {"tiny_scale": 0}
    cached = compile_kernel(spec, "sm_80", cache=tmp_path / "c", kernel_dir_override=kdir)
    assert cached.from_cache and cached.log_missing == ("tiny_scale",) and cached.registers == expected


def test_without_pyelftools_the_log_is_used_and_a_cached_entry_is_read_again_later(tiny_kernel, monkeypatch,
                                                                                   tmp_path):
    """Without pyelftools the registers come from ptxas' log; an incomplete log is still detected (and rebuilt
    once). A cache entry written that way gets the cubin's values when a process with pyelftools reads it."""
    _cubin_info()
    spec, kdir = tiny_kernel
    expected = compile_kernel(spec, "sm_80", use_cache=False, kernel_dir_override=kdir).registers
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "elftools", None)  # import elftools -> ImportError
        m.setitem(sys.modules, "sparsert.runtime.cubin_info", None)
        seen = _corrupt_ptxas_reports(m, calls=2)  # the build and its rebuild
        ck = compile_kernel(spec, "sm_80", cache=tmp_path / "c", kernel_dir_override=kdir)
        assert len(seen) == 2 and ck.log_missing == ("tiny_scale",) and ck.registers == {}
        clean = compile_kernel(spec, "sm_80", use_cache=False, kernel_dir_override=kdir)
        assert len(seen) == 3 and clean.registers == expected and not clean.log_missing  # from the log
    cached = compile_kernel(spec, "sm_80", cache=tmp_path / "c", kernel_dir_override=kdir)
    assert cached.from_cache and cached.registers == expected and cached.stack_frame == {"tiny_scale": 0}


def test_build_gate_runs_an_exclusive_rebuild_alone():
    """Builds share the gate; a rebuild waits for the running builds, and builds that arrive while it waits or
    runs start only after it (so a stream of builds cannot starve it)."""
    import threading
    import time

    from sparsert.runtime.kernel_build import BuildGate

    gate, events, lock = BuildGate(), [], threading.Lock()
    release = threading.Event()

    def note(what):
        with lock:
            events.append(what)

    def build(i, hold):
        with gate.shared():
            note(f"start {i}")
            if hold:
                release.wait(5)
            note(f"end {i}")

    def rebuild():
        with gate.exclusive():
            note("rebuild start")
            time.sleep(0.05)
            note("rebuild end")

    first = [threading.Thread(target=build, args=(i, True), daemon=True) for i in range(3)]
    for t in first:
        t.start()
    def wait_until(condition, what):
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, f"gate broken: {what} never happened ({events})"
            time.sleep(0.001)

    wait_until(lambda: sum(e.startswith("start") for e in events) == 3, "three builds running side by side")
    writer = threading.Thread(target=rebuild, daemon=True)
    writer.start()
    wait_until(lambda: gate._waiting or "rebuild start" in events, "the rebuild asking for the gate")
    late = threading.Thread(target=build, args=(9, False), daemon=True)
    late.start()
    time.sleep(0.05)
    assert "rebuild start" not in events and "start 9" not in events  # the rebuild waits; so does the late build
    release.set()
    for t in [*first, writer, late]:
        t.join(5)
    assert not any(t.is_alive() for t in [*first, writer, late]), f"gate broken: a thread never finished ({events})"
    assert all(events.index(f"end {i}") < events.index("rebuild start") for i in range(3))
    assert events.index("rebuild end") < events.index("start 9")


def test_incomplete_log_rebuild_runs_with_no_other_build(tiny_kernel, monkeypatch):
    """The rebuild after an incomplete log holds the gate exclusively (NVRTC 13.0's suspected parallel-build
    problem): no other compile_kernel build runs while it does."""
    from sparsert.runtime import kernel_build

    spec, kdir = tiny_kernel
    _corrupt_ptxas_reports(monkeypatch, calls=1)
    real, states = kernel_build._compile_nvrtc, []

    def observed(*args, **kwargs):
        states.append((kernel_build._BUILD_GATE._exclusive, kernel_build._BUILD_GATE._running))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_build, "_compile_nvrtc", observed)
    compile_kernel(spec, "sm_80", use_cache=False, kernel_dir_override=kdir)
    assert states == [(False, 1), (True, 0)]



def test_an_interrupted_rebuild_wait_does_not_hold_later_builds():
    """Ctrl-C while a rebuild waits for running builds: later builds must still run."""
    import threading
    import time

    from sparsert.runtime.kernel_build import BuildGate

    gate, release = BuildGate(), threading.Event()

    def build():
        with gate.shared():
            release.wait(5)

    holder = threading.Thread(target=build, daemon=True)
    holder.start()
    deadline = time.monotonic() + 5
    while not gate._running:
        assert time.monotonic() < deadline, "the build never entered the gate"
        time.sleep(0.001)
    original = gate._cond.wait_for

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    gate._cond.wait_for = interrupted
    with pytest.raises(KeyboardInterrupt):
        with gate.exclusive():
            pass
    gate._cond.wait_for = original
    release.set()
    holder.join(5)
    assert gate._waiting == 0 and not gate._exclusive
    done = threading.Event()

    def later():
        with gate.shared():
            done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(5), "a build after the interrupted rebuild never ran"
