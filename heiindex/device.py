"""Where torch work runs: a checked device, and the process-wide TF32 switches.

What this module must not do: move data (``Index.to`` does, with these two helpers). torch is
imported inside the functions, so that the CLI can list the precisions without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import SettingError

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "check_precision", "resolve_device", "set_precision"]

PRECISIONS = ("float32", "tf32", "bfloat16")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``: "cpu" or "cuda[:N]"; anything else (another kind, a
    malformed name, a CUDA device without a GPU or beyond the GPUs there) is a clear error."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SettingError("device", f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"device {str(device)!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SettingError(
            "device", f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices"
        )
    return dev


def check_precision(dtype: str) -> None:
    if dtype not in PRECISIONS:
        raise SettingError("dtype", f"dtype must be one of {', '.join(PRECISIONS)}, got {dtype!r}")


def set_precision(dtype: str) -> None:
    """Set torch's TF32 switches for ``dtype``: on for "tf32", off otherwise.

    Both switches matter on NVIDIA GPUs: cuBLAS's (matrix products; off by default) and cuDNN's
    (on by default, and it covers the text encoder's GRU). With cuDNN's left on, a float32 query
    encoded on an H200 scored 3e-5 away from the same query encoded on CPU; with both off, float32
    on the GPU agrees with the CPU to float32 rounding. The switches are process-wide (torch has
    no per-tensor form): ``Index.to`` with a CUDA device and a build on a CUDA device set them;
    CPU work leaves them alone.
    """
    check_precision(dtype)
    import torch

    tf32 = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
