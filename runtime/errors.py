"""One error hierarchy for sparsert.

Every error a user can cause (bad data path, corrupt artifact, wrong tensor shape, bad flag value) is raised
as a subclass of :class:`SparsertError` with a one-line message that names the tensor, file or flag and what
was expected. The CLI turns these into ``error: <message>`` and a non-zero exit code.
"""

from __future__ import annotations


class SparsertError(Exception):
    """Base class of every user-facing sparsert error."""


class FormatError(SparsertError, ValueError):
    """A tensor does not fit a sparse/quantized format (shape, dtype, divisibility, pattern)."""


class ArtifactError(SparsertError):
    """A compressed artifact or checkpoint on disk is missing, corrupt, truncated or inconsistent."""


class DataError(SparsertError):
    """A training corpus is missing, unreadable or empty."""


class ConfigError(SparsertError, ValueError):
    """A configuration value (preset, flag, option) is invalid."""


class ExportError(SparsertError):
    """An ONNX export failed its checks or its parity test."""


class DeviceError(SparsertError):
    """A CUDA call, kernel build or launch failed, or the device cannot run the requested kernel."""


class DistributedError(SparsertError):
    """The processes of a multi-process (torchrun) run disagree — their shards or buffers differ from what the
    others hold — or another rank failed, so this one cannot go on (``train/distributed.py``)."""


class StoppedBySignal(Exception):
    """Not an error: a signal asked a long job to stop (``sparsert train`` on SIGTERM or SIGUSR1, a batch
    scheduler's preemption or time-limit warning) and it stopped cleanly after saving what a resume needs. The
    message says what was kept and how to go on; the CLI exits with status 128 + ``signum`` (143 for SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: a dtype as error messages name it."""
    return str(dtype).replace("torch.", "")


def require_path(value: object, what: str, expected: str, error: type[SparsertError] = ConfigError) -> None:
    """Raise ``error`` ("WHAT: expected EXPECTED, got ''") for an empty or blank path given by the user: it would
    otherwise become ``Path("")``, the current directory, and be read or written there silently. None passes."""
    if value is not None and not str(value).strip():
        raise error(f"{what}: expected {expected}, got {str(value)!r}")
