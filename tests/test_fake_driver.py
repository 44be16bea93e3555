"""The runtime's load, launch and memory paths against a fake CUDA driver, on a machine without a GPU.

Nothing else on CPU reaches the calls that follow the NVRTC build: ``ObjectCode.from_cubin`` /
``get_kernel``, ``launch``, the shared-memory attribute, the memory pool. ``tests/fake_cuda/fake_libcuda.c``
is a stand-in ``libcuda.so.1`` (no kernel runs; it logs the driver calls it receives, keeps the current
context per thread, and refuses a launch on a thread without one, as the real driver does). A subprocess
loads it through ``LD_LIBRARY_PATH`` under the real cuda.bindings / cuda.core, with the kernels built
beforehand by NVRTC in this process (NVRTC must not see the fake driver).

It caught two faults no CPU test saw: the lowered kernel names reached the driver as ``str`` (every kernel
load failed: cuda.core wants bytes), and a launch from a thread with no current context (torch's autograd
backward thread) failed with CUDA_ERROR_INVALID_CONTEXT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

cuda_core = pytest.importorskip("cuda.core", reason="cuda-core is not installed (pip install 'sparsert[cuda]')")

from sparsert.runtime.kernel_build import compile_kernel  # noqa: E402
from sparsert.runtime.kernels import PRUNE24_SPEC  # noqa: E402
from sparsert.runtime.sparse_gemm import plan_sparse24  # noqa: E402

FAKE_SOURCE = Path(__file__).parent / "fake_cuda" / "fake_libcuda.c"
ARCH = "sm_80"
PRUNE_EXPR = "prune24_compress<unsigned short, false>"
# A GEMM tile above the 48 KB default shared-memory limit: its launch must raise the kernel's limit first.
GEMM = plan_sparse24(2048, 4096, 4096, torch.bfloat16, ARCH, 232448)

SCRIPT = textwrap.dedent("""
    import json, sys, threading, types
    import numpy as np
    import torch

    # CPU torch has no CUDA streams: the default stream stands in for torch's current one.
    torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0)

    from sparsert.runtime.device import get_device
    from sparsert.runtime.errors import DeviceError
    from sparsert.runtime.kernel_build import load_kernel
    from sparsert.runtime.kernels import PRUNE24_SPEC
    from sparsert.runtime.sparse_gemm import _launch, plan_sparse24

    mode = sys.argv[1]
    out = {}
    dev = get_device(0)
    out["arch"] = dev.arch
    x = torch.zeros(16)
    kernel = load_kernel(PRUNE24_SPEC, "PRUNE_EXPR", 0)
    if mode == "fail":
        try:
            kernel((3, 1, 1), 128, x, x, x, 16, 64, stream=0)
        except DeviceError as exc:
            out["error"] = str(exc)
        print(json.dumps(out))
        sys.exit(0)
    kernel((3, 1, 1), 128, x, x, x, 16, 64, stream=0)

    def worker():  # a thread with no current context, like torch's autograd backward thread
        try:
            kernel((5, 1, 1), 128, x, x, x, 16, 64, stream=0)
            out["thread"] = "ok"
        except Exception as exc:
            out["thread"] = str(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    plan = plan_sparse24(2048, 4096, 4096, torch.bfloat16, dev.arch, 232448)
    _launch(plan.spec, plan.expr, 0, plan.grid, plan.block, plan.smem, x, x, x, np.uint64(0), x,
            2048, 4096, 4096, 0)
    buf = dev.pool.allocate(1000, stream=0)
    out["alloc"] = [buf.nbytes, buf.ptr != 0]
    buf.close(stream=0)
    print(json.dumps(out))
""").replace("PRUNE_EXPR", PRUNE_EXPR)


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    """(library folder, kernel cache folder, {expr: lowered name}) with the kernels already built."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the fake libcuda.so.1")
    root = tmp_path_factory.mktemp("fake_cuda")
    lib = root / "lib"
    lib.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib / "libcuda.so.1"), str(FAKE_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    cache = root / "kernels"
    os.environ["SPARSERT_CACHE_DIR"], saved = str(cache), os.environ.get("SPARSERT_CACHE_DIR")
    try:
        lowered = {}
        for spec, expr in ((PRUNE24_SPEC, PRUNE_EXPR), (GEMM.spec, GEMM.expr)):
            compiled = compile_kernel(spec, ARCH, want=("cubin",))
            lowered[expr] = compiled.lowered_names[expr]
    finally:
        if saved is None:
            del os.environ["SPARSERT_CACHE_DIR"]
        else:
            os.environ["SPARSERT_CACHE_DIR"] = saved
    return lib, cache, lowered


def _run(fake_driver, tmp_path, mode: str, **env) -> tuple[dict, list[list[str]]]:
    lib, cache, _ = fake_driver
    log = tmp_path / f"driver-{mode}.log"
    full_env = dict(os.environ, LD_LIBRARY_PATH=f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}",
                    SPARSERT_CACHE_DIR=str(cache), FAKE_CUDA_CC="8.0", FAKE_CUDA_LOG=str(log), **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=full_env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return json.loads(proc.stdout.strip().splitlines()[-1]), calls


def test_kernels_load_and_launch_through_the_driver(fake_driver, tmp_path):
    _, _, lowered = fake_driver
    out, calls = _run(fake_driver, tmp_path, "ok")
    assert out["arch"] == ARCH
    handles = {c[1]: c[2] for c in calls if c[0] == "kernel"}
    # The driver received the lowered (mangled) names, as C strings.
    assert set(handles) == {lowered[PRUNE_EXPR], lowered[GEMM.expr]}
    prune, gemm = handles[lowered[PRUNE_EXPR]], handles[lowered[GEMM.expr]]
    launches = [c for c in calls if c[0] == "launch"]
    assert [(c[1], c[2]) for c in launches] == [(prune, "3"), (prune, "5"), (gemm, str(GEMM.grid[0]
                                                                                     if isinstance(GEMM.grid, tuple)
                                                                                     else GEMM.grid))]
    # Every launch had a current context, the one from the fresh thread too.
    assert out["thread"] == "ok"
    assert all(c[-1] == "1" for c in launches)
    # The GEMM's shared memory (> 48 KB) was granted before its launch; block and shared memory as planned.
    assert GEMM.smem > 48 * 1024
    gemm_attr = [i for i, c in enumerate(calls) if c[0] == "attr" and c[1] == gemm]
    gemm_launch = next(i for i, c in enumerate(calls) if c[0] == "launch" and c[1] == gemm)
    assert gemm_attr and gemm_attr[0] < gemm_launch
    assert calls[gemm_attr[0]][3] == str(GEMM.smem)
    block = GEMM.block if isinstance(GEMM.block, tuple) else (GEMM.block, 1, 1)
    assert calls[gemm_launch][5:9] == [*map(str, block), str(GEMM.smem)]
    # The memory pool allocated and freed stream-ordered.
    assert out["alloc"] == [1000, True]
    assert ["alloc", "1000"] in calls and ["free"] in calls


def test_failed_launch_names_the_kernel_and_the_driver_error(fake_driver, tmp_path):
    out, _ = _run(fake_driver, tmp_path, "fail", FAKE_CUDA_FAIL_LAUNCH="1")
    assert PRUNE_EXPR in out["error"] and "CUDA_ERROR_LAUNCH_FAILED" in out["error"], out["error"]


TENSOR_MAP_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from sparsert.runtime.errors import FormatError
    from sparsert.runtime.tensor_map import encode_tiled_2d

    raw = encode_tiled_2d(0x7f0000001000, 300, 11008, torch.bfloat16, 256)
    out = {"len": len(raw), "addr": int.from_bytes(raw[:8], "little")}
    try:
        encode_tiled_2d(0x7f0000001008, 300, 11008, torch.bfloat16, 256)
    except FormatError as exc:
        out["misaligned"] = str(exc)
    print(json.dumps(out))
""")


def test_tensor_map_encoding_reaches_the_driver(fake_driver, tmp_path):
    """The TMA map of X [M, K] for ``sparse24_gemm_sm90_tma``: the driver gets dims {K, M}, a 2K-byte row
    stride, a {64, BT} box, bf16, 128-byte swizzle, 256-byte L2 promotion and zero out-of-bounds fill (the
    cuda.bindings argument types are checked by the real binding on the way); a misaligned address is refused
    before the driver is called."""
    from cuda.bindings import driver as drv

    lib, cache, _ = fake_driver
    log = tmp_path / "driver-tmap.log"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               SPARSERT_CACHE_DIR=str(cache), FAKE_CUDA_CC="9.0", FAKE_CUDA_LOG=str(log))
    proc = subprocess.run([sys.executable, "-c", TENSOR_MAP_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["len"] == 128 and out["addr"] == 0x7f0000001000
    assert "16-byte aligned" in out["misaligned"]
    calls = [line.split() for line in log.read_text().splitlines() if line.startswith("tensormap")]
    assert len(calls) == 1
    expect = [int(drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16), 2, None, 11008, 300, 2 * 11008, 64,
              256, 1, 1, int(drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE),
              int(drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B),
              int(drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B),
              int(drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)]
    got = calls[0][1:]
    assert int(got[2], 16) == 0x7f0000001000
    assert [int(v) for i, v in enumerate(got) if i != 2] == [v for i, v in enumerate(expect) if i != 2]


def test_tensor_map_bad_inputs_are_named():
    """X must be a contiguous 2-D CUDA tensor; without the CUDA driver the encoder says so as a DeviceError (not
    the loader's own exception type)."""
    import ctypes.util

    from sparsert.runtime import tensor_map
    from sparsert.runtime.errors import DeviceError, FormatError

    with pytest.raises(FormatError, match="must be on a CUDA device, got cpu"):
        tensor_map.device_tensor_map(torch.zeros(8, 64, dtype=torch.bfloat16), 64)
    with pytest.raises(FormatError, match="contiguous 2-D tensor"):
        tensor_map.device_tensor_map(torch.zeros(64, 8, dtype=torch.bfloat16).t(), 64)
    if ctypes.util.find_library("cuda") is None:
        with pytest.raises(DeviceError, match="tensor map: the CUDA driver is not available"):
            tensor_map.encode_tiled_2d(0x7f0000001000, 300, 11008, torch.bfloat16, 256)
