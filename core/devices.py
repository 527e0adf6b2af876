"""Device and dtype selection shared by every subcommand that runs a model."""

from __future__ import annotations

import torch

from renderqa.core.errors import DeviceError, InvalidInputError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str) -> torch.device:
    """Map `auto`, `cuda`, `cuda:N`, `mps` or `cpu` to an available torch device.

    `auto` picks CUDA, then Apple's MPS, then the CPU.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(
            f"--device {name!r} is not a device name; use one of "
            f"{', '.join(DEVICE_CHOICES)} or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name!r} requested but CUDA is not available here; "
            "use --device cpu or auto"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(
            f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"--device {name!r} requested but MPS is not available; use --device cpu"
        )
    if device.type not in {"cuda", "mps", "cpu"}:
        raise InvalidInputError(
            f"--device {name!r} is not supported; use one of {', '.join(DEVICE_CHOICES)}"
        )
    return device


def resolve_dtype(
    name: str, device: torch.device, option: str = "--dtype"
) -> torch.dtype:
    """Map `auto`, `fp32`, `fp16` or `bf16` to a torch dtype the device can run.

    `auto` is fp16 on CUDA and MPS and fp32 on the CPU, where fp16 kernels are slow.
    bf16 on CUDA needs compute capability 8.0 (Ampere) or newer.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise InvalidInputError(
            f"{option} {name!r} is unknown; use one of {', '.join(DTYPE_CHOICES)}"
        )
    dtype = DTYPES[name]
    bf16_missing = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    if dtype is torch.bfloat16 and bf16_missing:
        raise DeviceError(
            f"{option} bf16 is not supported by this GPU (needs Ampere or newer); "
            "use fp16 or fp32"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name (fp32, fp16, bf16) of a floating-point dtype."""
    for name, candidate in DTYPES.items():
        if candidate is dtype:
            return name
    return str(dtype).removeprefix("torch.")
