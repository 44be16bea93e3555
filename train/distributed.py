"""Multi-GPU / multi-node training through ``torch.distributed``: DDP and FSDP2, started by ``torchrun``.

Launch (torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc-per-node 2 -m sparsert train --distributed ddp ...          # 2 processes, one machine
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m sparsert train --distributed fsdp ...  # 2 machines x 8 GPUs

Under torchrun with more than one process and no ``--distributed``, training uses DDP. :func:`init_distributed`
joins the process group: backend ``nccl`` with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is
available, else ``gloo`` on CPU.

What makes a run on W ranks the run of one process with the same global batch:

- **Data** (:class:`RankShardedData`): every rank draws the same global batch of ``batch_size`` windows from
  the same seeded generator — so the sampler state, and a checkpoint of it, does not depend on W — and keeps
  rows ``r·B/W .. (r+1)·B/W − 1`` (``batch_size`` must be divisible by W). The loss logged is the mean over
  the ranks' equal shards (:func:`global_mean`) = the global-batch mean, and DDP / FSDP2 average gradients
  over ranks = the global-batch gradient. Validation batches are split the same way, their losses averaged.
  Only the float summation order differs from one process (see tests/test_distributed.py for the tolerance).
- **DDP** (``DistributedDataParallel``, Li et al., VLDB 2020): every rank holds the full model and the same
  bitwise weights (the all-reduced gradients are identical), hence computes the same masks; after each mask
  update the mask buffers that changed are broadcast from rank 0 anyway (:func:`sync_masks`), so a
  data-dependent mask score (Wanda's activation norms, collected per rank on its own rows of the batch) cannot
  make the replicas drift apart — it then uses rank 0's statistics.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``, one unit per decoder block plus the root; Zhao et al.,
  VLDB 2023): each parameter is sharded along dim 0, ``torch.chunk`` style (rank r holds rows
  ``r·c .. (r+1)·c − 1``, ``c = ceil(out / W)``), so a shard of ``W [out, K]`` holds whole rows and N:M
  groups (along K) never straddle two ranks. Masks are computed where the rows are: inside
  :func:`local_rows` each SparseLinear's ``weight`` is this rank's rows and its ``[out, K]`` buffers (``mask``,
  ``forward_mask``) are views of the same rows; the refresh runs on them and the rows are then all-gathered,
  so every rank ends with the same full mask buffers (buffers are not sharded by FSDP2: the forward pass
  multiplies the unsharded weight by the full mask; this costs one byte per weight on every rank). A
  transposable 2:4 mask (Hu et al., ICML 2024) is chosen per 4×4 block, so every shard must start on a
  multiple of 4 rows: :func:`check_fsdp_shards` refuses a world size that would split a 4-row block (or leave
  a rank without rows), naming the layer. Mask rules that are not row-local apply per shard: the gradual
  schedule's per-tensor soft threshold (:func:`sparsert.train.schedules.gradual_nm_mask`) keeps the same
  share of every shard instead of the whole tensor's top share, and Wanda's activation norms are each rank's
  own (all-reducing them before a refresh would make AST+Wanda exact). Flip rates are summed over ranks.
- **Checkpoints** (:meth:`DistContext.save_checkpoint`): the full state — FSDP2 shards gathered with
  ``DTensor.full_tensor`` one tensor at a time — is written by rank 0 in the single-process format of
  :mod:`sparsert.train.checkpoint`, so a checkpoint of N ranks resumes on M ranks (or one). Every rank loads
  the full checkpoint into the plain model and optimizer, then :meth:`DistContext.wrap` shards them.
- Only rank 0 writes metrics, progress, messages, checkpoints and the final artifact (a shared file system
  is assumed for the run directory when several machines take part).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsert.runtime import errors
from sparsert.runtime.errors import ConfigError, DeviceError, DistributedError, FormatError, SparsertError
from sparsert.train.checkpoint import CHECKPOINTS, save_checkpoint, step_dir_name
from sparsert.train.metrics import MetricsLog
from sparsert.train.sparse_linear import SparseLinear

MODES = ("ddp", "fsdp")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BLOCK_ROWS = 4  # rows of a transposable 2:4 block
LAUNCH_HINT = "torchrun --nproc-per-node N -m sparsert train --distributed {mode} ..."

_ACTIVE: DistContext | None = None  # the process's context, set by init_distributed, cleared by close()


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: object) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the torchrun variables, or None when none of them is set.

    ConfigError naming the variable when only some are set or one is not a valid integer.
    """
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in env]
    if not present:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise ConfigError(f"torchrun environment: {missing[0]} is not set but {present[0]} is "
                          f"(expected all of {', '.join(TORCHRUN_VARS)}; start with torchrun)")
    values = []
    for var in TORCHRUN_VARS:
        try:
            values.append(int(env[var]))
        except ValueError:
            raise ConfigError(f"torchrun environment: {var}={env[var]!r} is not an integer") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                          "(expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)")
    return rank, world, local


def check_mode(mode: object) -> str | None:
    """``mode`` if it is None, ``"ddp"`` or ``"fsdp"``; ConfigError naming ``--distributed`` otherwise."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--distributed: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


class NullMetricsLog:
    """What non-zero ranks get instead of a :class:`~sparsert.train.metrics.MetricsLog`: writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


@dataclass
class DistContext:
    """This process's place in a distributed run (``mode`` None: a plain single-process run).

    ``device``: where the model and batches live (``cuda:LOCAL_RANK`` with nccl, CPU with gloo).
    ``owns_group``: the process group was created by :func:`init_distributed` (and :meth:`close` destroys it).
    """

    mode: str | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """Mean of a Python float over the ranks (the value itself in a single process)."""
        if not self.enabled or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def max_over_ranks(self, value: int) -> int:
        """The largest of an int over the ranks (e.g. a signal number, 0 for none): one all-reduce, so every
        rank takes the same branch after it; the value itself in a single process."""
        if not self.enabled or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None, what: str) -> None:
        """Raise everywhere what rank 0 raised (``error``) while doing ``what`` alone, so the other ranks do
        not wait for it forever; rank 0 re-raises its own exception. The other ranks raise the same
        :mod:`sparsert.runtime.errors` class when rank 0's error is one (an ArtifactError stays an
        ArtifactError), else :class:`DistributedError`, the message naming rank 0's error."""
        sent = None if error is None else (type(error).__name__, f"{type(error).__name__}: {error}")
        received = self.broadcast(sent)
        if error is not None:
            raise error
        if received is not None:
            kind = getattr(errors, received[0], None)
            if not (isinstance(kind, type) and issubclass(kind, SparsertError)):
                kind = DistributedError
            raise kind(f"rank 0 failed while {what}: {received[1]}")

    # ------------------------------------------------------------------------------------------ data

    def shard_data(self, data: Any, batch_size: int) -> Any:
        """``data`` (a :class:`~sparsert.train.data.TokenData`) as seen by this rank: its share of every
        global batch, on this rank's device. ConfigError when ``batch_size`` does not split evenly."""
        if not self.enabled:  # one process: the batches only need to reach its device
            return data if self.device.type == "cpu" else RankShardedData(data, 0, 1, self.device)
        if batch_size % self.world_size:
            raise ConfigError(
                f"--batch-size {batch_size} is not divisible by the world size {self.world_size}: the global "
                f"batch is split into {self.world_size} equal shares, one per rank"
            )
        return RankShardedData(data, self.rank, self.world_size, self.device)

    # ------------------------------------------------------------------------------------------ model

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move a freshly built model to this rank's device and, under FSDP2, check its shards
        (:func:`check_fsdp_shards`) — before anything of the run is written. Returns ``model``."""
        if self.mode == "fsdp":
            check_fsdp_shards(model, self.world_size)
        return model.to(self.device)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Distribute a model and its optimizer (loaded from a checkpoint or fresh) over the ranks.

        ``model`` is the plain model (identical on every rank: FSDP2 additionally broadcasts rank 0's
        parameters and buffers before sharding, DDP does so itself); ``make_optimizer(plain_model)`` must
        build the optimizer the same way ``optimizer`` was built. Returns the model to train (DDP: the
        ``DistributedDataParallel`` wrapper; FSDP2: the same module, sharded in place) and a new optimizer over
        its parameters holding ``optimizer``'s state (sharded like the parameters under FSDP2).
        A single-process context returns its arguments unchanged.
        """
        if not self.enabled:
            return model, optimizer
        if self.mode == "fsdp":
            check_fsdp_shards(model, self.world_size)
        state = optimizer.state_dict()
        model.to(self.device)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are synced from rank 0 at construction; masks are then kept identical by sync_masks after
            # each refresh, so no buffer broadcast before every forward pass (torch >= 2.13 renamed the flag).
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else \
                {"broadcast_buffers": False}
            wrapped: nn.Module = DistributedDataParallel(model, device_ids=device_ids, **no_sync)
            new = make_optimizer(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            _broadcast_module(model)
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in decoder_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
            new = make_optimizer(model)
            state = _shard_optimizer_state(state, new)
        new.load_state_dict(state)
        return wrapped, new

    # ------------------------------------------------------------------------------------------ outputs

    def metrics_log(self, path: str | Path, *, truncate_to: int | None = None) -> MetricsLog | NullMetricsLog:
        """The run's metrics log on rank 0; a log that writes nothing on the other ranks."""
        if self.is_main:
            return MetricsLog(path, truncate_to=truncate_to)
        return NullMetricsLog()

    def save_checkpoint(self, run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, *, keep: int = 2) -> Path:
        """:func:`sparsert.train.checkpoint.save_checkpoint` of the full (gathered) model and optimizer state,
        written by rank 0 in the single-process format; every rank must call it and gets the step directory."""
        plain = unwrap(model)
        if not self.enabled:
            return save_checkpoint(run_dir, step, plain, optimizer, state, keep=keep)
        model_state, optimizer_state = gather_full_state(plain, optimizer, keep=self.is_main)
        path = Path(run_dir) / CHECKPOINTS / step_dir_name(step)
        error = None
        if self.is_main:
            try:
                path = save_checkpoint(run_dir, step, plain, optimizer, state, keep=keep, model_state=model_state,
                                       optimizer_state=optimizer_state)
            except (SparsertError, OSError) as exc:
                error = exc
        self.agree(error, f"writing checkpoint step {step}")
        return path

    def close(self) -> None:
        """Leave the process group if this context created it; forget the context."""
        global _ACTIVE
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
        if _ACTIVE is self:
            _ACTIVE = None


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``--device``: ``auto`` (this rank's GPU when torch sees one, else the CPU), ``cpu`` or ``cuda``
    (ConfigError without a usable GPU; DeviceError for a LOCAL_RANK beyond the visible GPUs)."""
    if device not in DEVICES:
        raise ConfigError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU (use --device cpu)")
    if device == "cpu" or not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"--device {device}: LOCAL_RANK {local_rank} has no GPU of its own ({count} visible); "
                          "start at most one process per GPU, or use --device cpu")
    return torch.device("cuda", local_rank)


def _set_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(mode: str | None = None, *, environ: Mapping[str, str] | None = None,
                     device: str = "auto") -> DistContext:
    """The distributed context of this process, joining the process group when needed.

    ``mode``: ``"ddp"``, ``"fsdp"`` or None (DDP when started by torchrun with WORLD_SIZE > 1, else a
    single-process run). ``device`` (:func:`resolve_device`): where the model and batches live — this rank's
    GPU (backend nccl) or the CPU (gloo). A process group that already exists (e.g. created by the caller) is
    used as is.
    ConfigError for an unknown mode, or a mode without a torchrun environment (the message shows the launch
    command). Calling it again returns the same context (the mode must agree).
    """
    global _ACTIVE
    check_mode(mode)
    if _ACTIVE is not None:
        if mode is not None and _ACTIVE.mode != mode:
            raise ConfigError(f"--distributed {mode}: this process already runs distributed as {_ACTIVE.mode}")
        return _ACTIVE
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        env = torchrun_env(environ)
        local = env[2] if env is not None else rank
        owns = False
    else:
        env = torchrun_env(environ)
        if env is None:
            if mode is not None:
                raise ConfigError(
                    f"--distributed {mode}: no torchrun environment ({', '.join(TORCHRUN_VARS)} are not set); "
                    f"start the run with: {LAUNCH_HINT.format(mode=mode)}"
                )
            return DistContext(device=_set_device(resolve_device(device)))
        rank, world, local = env
        if world == 1 and mode is None:
            return DistContext(device=_set_device(resolve_device(device, local)))
        if not dist.is_available():
            raise ConfigError(f"--distributed {mode or 'ddp'}: this torch build has no torch.distributed")
        source = os.environ if environ is None else environ
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in source:
                raise ConfigError(f"torchrun environment: {var} is not set (start with torchrun)")
        owns = True
    if not owns and device == "auto" and dist.get_backend() == "gloo":
        device = "cpu"  # a caller's gloo group: its collectives are CPU ones (gloo on CUDA lacks most of them)
    where = _set_device(resolve_device(device, local))
    backend = "nccl" if where.type == "cuda" else "gloo"
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        backend = dist.get_backend()
    ctx = DistContext(mode=mode or "ddp", rank=rank, world_size=world, local_rank=local, device=where,
                      backend=backend, owns_group=owns)
    _ACTIVE = ctx
    return ctx


def active_context() -> DistContext:
    """The context of :func:`init_distributed` (a single-process context when there is none)."""
    return _ACTIVE if _ACTIVE is not None else DistContext()


def close_distributed() -> None:
    """Close the active context (leaving the process group if it was created here)."""
    if _ACTIVE is not None:
        _ACTIVE.close()


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: the process that writes outputs and messages."""
    return active_context().is_main


def global_mean(value: float) -> float:
    """Mean of ``value`` over the ranks of the active context (``value`` itself in a single process).

    The trainer reduces each step's loss with it *before* testing it for finiteness, so every rank takes the
    same decision on a non-finite loss (one rank returning early would leave the others waiting in backward).
    """
    return active_context().mean(value)


def global_means(*values: float | None) -> tuple[float | None, ...]:
    """:func:`global_mean` of several values at once (one all-reduce); None entries stay None."""
    ctx = active_context()
    if not ctx.enabled or ctx.world_size == 1:
        return values
    present = [v for v in values if v is not None]
    t = torch.tensor(present, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    means = iter((t / ctx.world_size).tolist())
    return tuple(None if v is None else next(means) for v in values)


@contextlib.contextmanager
def entered_on_ranks(model: nn.Module, manager: contextlib.AbstractContextManager) -> Iterator[Any]:
    """Enter ``manager`` through :func:`sync_masks` (for context managers whose ``__enter__`` recomputes masks,
    e.g. ``MaskController.sparse_view``), yield its value, exit it normally."""
    with contextlib.ExitStack() as stack:
        yield sync_masks(model, lambda: stack.enter_context(manager))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- data


class RankShardedData:
    """A :class:`~sparsert.train.data.TokenData` whose batches are this rank's rows of every global batch.

    ``get_batch`` draws the global batch exactly as one process would (same generator calls) and returns rows
    ``rank·b/W .. (rank+1)·b/W − 1`` (x, y int64 [b/W, T] on ``device``); ``val_batches`` splits each
    validation batch the same way. A batch whose size is not a multiple of W (a validation set smaller than
    one batch) is kept whole on every rank. Every other attribute is the wrapped data's.
    """

    def __init__(self, data: Any, rank: int, world_size: int, device: torch.device) -> None:
        self.data, self.rank, self.world_size, self.device = data, rank, world_size, device

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)

    def _rows(self, x: torch.Tensor, y: torch.Tensor,
              device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if b % self.world_size == 0:
            share = b // self.world_size
            x, y = x[self.rank * share:(self.rank + 1) * share], y[self.rank * share:(self.rank + 1) * share]
        target = self.device if device is None else device
        return x.contiguous().to(target), y.contiguous().to(target)

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.get_batch(split, batch_size, seq_len, generator=generator)
        return self._rows(x, y, device)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                    device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.data.val_batches(batch_size, seq_len, max_batches):
            yield self._rows(x, y, device)


# ---------------------------------------------------------------------------------------------- FSDP2 shards


def shard_spans(rows: int, world_size: int) -> list[tuple[int, int]]:
    """``(first row, row count)`` of each rank's dim-0 shard of a tensor with ``rows`` rows under FSDP2
    (``torch.chunk`` into ``world_size`` pieces of ``ceil(rows / world_size)`` rows; trailing ranks may get
    fewer or none)."""
    chunk = -(-rows // world_size) if rows else 0
    spans = []
    for r in range(world_size):
        start = min(r * chunk, rows)
        spans.append((start, min(chunk, rows - start)))
    return spans


def _needs_row_blocks(module: SparseLinear) -> bool:
    return bool(getattr(module.config, "transposable", False))


def _shard_problem(rows: int, world_size: int, blocks: bool) -> str | None:
    spans = shard_spans(rows, world_size)
    if any(count == 0 for _, count in spans):
        return "empty"
    if blocks and any(start % BLOCK_ROWS for start, _ in spans):
        return "split"
    return None


def check_fsdp_shards(model: nn.Module, world_size: int) -> None:
    """Refuse (ConfigError naming the layer, its rows and the world size) an FSDP2 world size under which a
    SparseLinear's dim-0 shards would leave a rank without rows, or — for a transposable 2:4 mask, chosen
    per 4×4 block — start a shard inside a 4-row block. The message lists world sizes that work."""
    from sparsert.train.sparsify import sparse_modules

    layers = [(name, m.weight.shape[0], _needs_row_blocks(m)) for name, m in sparse_modules(model).items()]
    for name, rows, blocks in layers:
        problem = _shard_problem(rows, world_size, blocks)
        if problem is None:
            continue
        ok = [w for w in range(1, max(2 * world_size, 64) + 1)
              if all(_shard_problem(r, w, b) is None for _, r, b in layers)]
        shown = ", ".join(str(w) for w in ok[:8]) + (", ..." if len(ok) > 8 else "")
        chunk = -(-rows // world_size)
        if problem == "empty":
            raise ConfigError(
                f"--distributed fsdp: layer '{name}' has {rows} rows, too few for world size {world_size} "
                f"(shards of {chunk} rows leave a rank without any, and masks are computed where the rows are); "
                f"world sizes that work: {shown}; or use --distributed ddp"
            )
        raise ConfigError(
            f"--distributed fsdp: layer '{name}' has {rows} rows; with world size {world_size} each rank holds "
            f"{chunk} rows, so a shard boundary would split a 4-row block of its transposable 2:4 mask; "
            f"world sizes that work: {shown}; or use --distributed ddp"
        )


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the blocks of the model's decoder (the ``nn.ModuleList`` holding
    the most SparseLinear / ``nn.Linear`` layers: ``blocks`` of a DecoderLM, ``model.layers`` of an HF Llama,
    ``transformer.h`` of GPT-2). Empty when the model has no such list (then only the root is sharded)."""
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            count = sum(isinstance(m, (nn.Linear, SparseLinear)) for m in module.modules())
            if count > best_count:
                best, best_count = module, count
    return list(best) if best is not None else []


@torch.no_grad()
def _broadcast_(t: torch.Tensor) -> None:
    """Rank 0's ``t`` on every rank, in place (a bool tensor travels as uint8: not every backend sends bool)."""
    if t.dtype == torch.bool:
        tmp = t.to(torch.uint8)
        dist.broadcast(tmp, src=0)
        t.copy_(tmp.bool())
    else:
        dist.broadcast(t.data, src=0)


def _broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (in place)."""
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        _broadcast_(t)


def _shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict with every per-parameter tensor of a parameter's shape turned into a DTensor
    sharded like that parameter (this rank keeps its rows; no communication: every rank has the full state)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        p = params[index]
        converted = {}
        for key, value in entry.items():
            if _is_dtensor(p) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                value = distribute_tensor(value.to(device=p.device_mesh.device_type, dtype=p.dtype), p.device_mesh,
                                          p.placements, src_data_rank=None)
            converted[key] = value
        out["state"][index] = converted
    return out


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                      keep: bool) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """Full CPU copies of ``model.state_dict()`` and ``optimizer.state_dict()`` when the model is FSDP2-sharded
    (collective: every rank must call it; tensors gathered one at a time), kept where ``keep`` (rank 0) and
    None elsewhere. ``(None, None)`` for a model without sharded parameters (its state is already full)."""
    model_sd = model.state_dict()
    if not any(_is_dtensor(v) for v in model_sd.values()):
        return None, None
    full_model: dict[str, torch.Tensor] = {}
    for name, value in model_sd.items():
        if _is_dtensor(value):
            value = value.full_tensor()
        if keep:
            full_model[name] = value.detach().cpu()
    opt_sd = optimizer.state_dict()
    full_state: dict[int, dict] = {}
    for index in sorted(opt_sd["state"]):
        entry = {}
        for key, value in opt_sd["state"][index].items():
            if _is_dtensor(value):
                value = value.full_tensor()
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
            entry[key] = value
        if keep:
            full_state[index] = entry
    if not keep:
        return None, None
    return full_model, {"state": full_state, "param_groups": opt_sd["param_groups"]}


@dataclass
class _Swap:
    name: str
    module: SparseLinear
    weight: Any  # the DTensor parameter
    start: int
    count: int
    views: dict[str, tuple[torch.Tensor, torch.Tensor, int]]  # buffer -> (full buffer, view of our rows, version)


def _sharded_layers(model: nn.Module) -> list[tuple[str, SparseLinear, Any]]:
    from sparsert.train.sparsify import sparse_modules

    out = []
    for name, module in sparse_modules(model).items():
        w = module._parameters.get("weight")
        if _is_dtensor(w):
            out.append((name, module, w))
    return out


def _row_buffers(module: nn.Module, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The module's buffers of the weight's shape ``[out, K]`` (``mask``, a set ``forward_mask``), by name."""
    return {name: b for name, b in module._buffers.items() if b is not None and tuple(b.shape) == tuple(shape)}


@contextlib.contextmanager
def local_rows(model: nn.Module, *, sync: bool = False) -> Iterator[list[_Swap]]:
    """Inside, each FSDP2-sharded SparseLinear of ``model`` shows only this rank's rows: ``weight`` is a
    Parameter over the local shard [rows_r, K] (sharing its storage, ``.grad`` the local gradient rows) and
    every ``[out, K]`` buffer (``mask``, ``forward_mask``) a view of the same rows. Code that reads or updates
    weights, gradients or masks outside the forward pass (mask refresh, masked decay) then works on the
    shard. With ``sync``, the ``[out, K]`` buffers changed inside — updated in place or newly assigned on the
    local rows, on any rank — are all-gathered on exit so every rank holds the same full buffers (every rank
    must then enter and leave it together). A no-op for a model without sharded parameters (single process,
    DDP). Yields the swaps (for flip-rate bookkeeping).
    """
    layers = _sharded_layers(model)
    if not layers:
        yield []
        return
    swaps: list[_Swap] = []
    ok = False
    try:
        for name, module, w in layers:
            rows, k = w.shape
            mesh = w.device_mesh
            start, count = shard_spans(rows, mesh.size())[mesh.get_local_rank()]
            local = w.to_local()
            if tuple(local.shape) != (count, k):
                raise FormatError(f"{name}: local shard has shape {tuple(local.shape)}, expected ({count}, {k}) "
                                  "(FSDP2 dim-0 sharding)")
            p = nn.Parameter(local, requires_grad=w.requires_grad)
            if w.grad is not None:
                p.grad = w.grad.to_local()
            views = {bname: (buf, buf[start:start + count], buf._version)
                     for bname, buf in _row_buffers(module, (rows, k)).items()}
            module._parameters["weight"] = p
            for bname, (_, view, _) in views.items():
                module._buffers[bname] = view
            swaps.append(_Swap(name, module, w, start, count, views))
        yield swaps
        ok = True
    finally:
        candidates = _restore(swaps)
        if sync and ok:
            _gather_rows(candidates, layers[0][2].device_mesh.get_group())


def _restore(swaps: list[_Swap]) -> list[tuple[torch.Tensor, bool, list[tuple[int, int]]]]:
    """Put the DTensor weights and the full buffers back (a buffer newly assigned on the local rows gets a full
    buffer holding them). Returns every ``[out, K]`` buffer now set, in module order, as (full buffer, changed
    on this rank, every rank's row span)."""
    out = []
    for s in swaps:
        m = s.module
        m._parameters["weight"] = s.weight
        rows, k = s.weight.shape
        spans = shard_spans(rows, s.weight.device_mesh.size())
        for bname in list(m._buffers):
            cur = m._buffers[bname]
            if cur is None:
                continue
            old = s.views.get(bname)
            if old is not None and cur is old[1]:
                full, changed = old[0], old[0]._version != old[2]
            elif tuple(cur.shape) == (s.count, k):  # newly assigned on the local rows
                full = old[0] if old is not None and old[0].dtype == cur.dtype else cur.new_zeros(rows, k)
                full[s.start:s.start + s.count].copy_(cur)
                changed = True
            else:
                continue
            m._buffers[bname] = full
            out.append((full, changed, spans))
    return out


def _changed_anywhere(flags: list[bool], device: torch.device, group: Any = None) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks (one all-reduce), so every rank acts on the same set."""
    if not flags:
        return []
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def _gather_rows(candidates: list, group: Any) -> None:
    """All-gather, for every buffer changed on some rank, the rows each rank holds (bool sent as uint8)."""
    if not candidates:
        return
    changed = _changed_anywhere([c for _, c, _ in candidates], candidates[0][0].device, group)
    pending = [(full, spans) for (full, _, spans), c in zip(candidates, changed, strict=True) if c]
    if not pending:
        return
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    by_dtype: dict[torch.dtype, list] = {}
    for full, spans in pending:
        wire = torch.uint8 if full.dtype == torch.bool else full.dtype
        by_dtype.setdefault(wire, []).append((full, spans))
    for wire, items in by_dtype.items():
        parts = []
        for full, spans in items:
            start, count = spans[rank]
            piece = full.new_zeros(max(c for _, c in spans), full.shape[1], dtype=wire)
            piece[:count].copy_(full[start:start + count])
            parts.append(piece.reshape(-1))
        send = torch.cat(parts)
        sizes = [torch.zeros(1, dtype=torch.int64, device=send.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([send.numel()], dtype=torch.int64, device=send.device), group=group)
        if len({int(v) for v in sizes}) != 1:
            raise DistributedError("distributed mask sync: the ranks hold different mask buffers "
                                f"({[int(v) for v in sizes]} elements); a mask update must run on every rank")
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=group)
        for r in range(world):
            if r == rank:
                continue
            offset = 0
            for full, spans in items:
                start, count = spans[r]
                k = full.shape[1]
                if count:
                    full[start:start + count].copy_(recv[r][offset:offset + count * k].reshape(count, k).to(full.dtype))
                offset += max(c for _, c in spans) * k


def _mask_versions(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    from sparsert.train.sparsify import sparse_modules

    return [(module, name, buf._version) for module in sparse_modules(model).values()
            for name, buf in _row_buffers(module, tuple(module.weight.shape)).items()]


def _broadcast_changed_masks(model: nn.Module, before: list[tuple[nn.Module, str, int]], device: torch.device) -> None:
    """After a refresh under DDP: rank 0's version of every ``[out, K]`` mask buffer that changed on some rank
    (in place, or newly set) on every rank."""
    now = _mask_versions(model)
    old = {(id(m), name): v for m, name, v in before}
    flags = [(id(m), name) not in old or old[(id(m), name)] != v for m, name, v in now]
    changed = _changed_anywhere(flags, device)
    for (module, name, _), c in zip(now, changed, strict=True):
        if c:
            _broadcast_(module._buffers[name])


def sync_masks(model: nn.Module, refresh: Callable[[], Any]) -> Any:
    """Run ``refresh()`` — whatever recomputes the masks of ``model``'s SparseLinears (``refresh_masks``, a
    mask controller's step) — so that every rank ends with the same masks, and return its result with
    global flip rates.

    Single process: ``refresh()``. DDP: ``refresh()`` on every rank (identical weights, identical masks),
    then rank 0's version of every mask buffer that changed is broadcast. FSDP2: ``refresh()`` inside
    :func:`local_rows` (each rank refreshes its rows; the changed rows are all-gathered), then each refreshed
    layer's ``last_flip_rate`` is made global (flips summed over ranks / the layer's size), and the result —
    a flip rate (float or None) or an object with ``flip_rate`` and ``flip_rate_layers`` (e.g. ``MaskUpdate``)
    — is rewritten with those rates. Every rank must call it at the same point.
    """
    ctx = active_context()
    if not ctx.enabled:
        return refresh()
    if not _sharded_layers(model):
        before = _mask_versions(model)
        result = refresh()
        if ctx.world_size > 1:
            _broadcast_changed_masks(model, before, ctx.device)
        return result
    from sparsert.train.sparsify import sparse_modules

    layers = sparse_modules(model)
    for module in layers.values():
        module.last_flip_rate = None
    with local_rows(model, sync=True):
        result = refresh()
        local = [(m.last_flip_rate, m.mask.numel()) for m in layers.values()]
    device = next(iter(layers.values())).mask.device
    flips = torch.tensor([0.0 if r is None else round(r * n) for r, n in local], dtype=torch.float64, device=device)
    done = torch.tensor([0.0 if r is None else 1.0 for r, _ in local], dtype=torch.float64, device=device)
    dist.all_reduce(flips)
    dist.all_reduce(done, op=dist.ReduceOp.MAX)
    rates: dict[str, float] = {}
    total_flips = total = 0.0
    for (name, module), f, d in zip(layers.items(), flips.tolist(), done.tolist(), strict=True):
        if d:
            size = module.mask.numel()
            module.last_flip_rate = f / size
            rates[name] = f / size
            total_flips += f
            total += size
    overall = total_flips / total if total else None
    return _with_global_flips(result, overall, rates)


def _with_global_flips(result: Any, overall: float | None, rates: dict[str, float]) -> Any:
    if result is None:
        return None
    if isinstance(result, float):
        return overall if overall is not None else result
    if dataclasses.is_dataclass(result) and hasattr(result, "flip_rate") and hasattr(result, "flip_rate_layers"):
        if result.flip_rate is None:
            return result
        layers = result.flip_rate_layers
        new_layers = None if layers is None else {n: rates.get(n, v) for n, v in layers.items()}
        return dataclasses.replace(result, flip_rate=overall if overall is not None else result.flip_rate,
                                   flip_rate_layers=new_layers)
    return result
