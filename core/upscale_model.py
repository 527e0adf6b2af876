"""Loading upscaler checkpoints through spandrel into a runner the tiler can call.

spandrel detects the architecture from the state dict's keys (ESRGAN/RRDBNet,
Real-ESRGAN Compact, SwinIR, HAT and the others in its registry) and reports the
scale, channel counts, input size requirements and fp16/bf16 support. It does no
tiling; `renderqa.core.upscale` does.
"""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from spandrel import (
    MAIN_REGISTRY,
    ImageModelDescriptor,
    ModelLoader,
    UnsupportedModelError,
)

from renderqa.core.devices import dtype_name, resolve_dtype
from renderqa.core.errors import InvalidInputError, ModelLoadError

logger = logging.getLogger(__name__)

# Forward(tiles) -> upscaled tiles. The input is (B, C, h, w) in [0, 1] on the
# runner's device and dtype. The output is (B, C_out, h * scale, w * scale) in
# [0, 1] with the same dtype.
TileForward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Upscaler:
    """An upscaling model ready to run tiles, with the facts the tiler needs.

    `forward` runs at `dtype` on `device`. `forward_fp32`, when set, runs the same
    weights in fp32 on the same device, for tiles that fail in fp16 or bf16. Tile
    inputs must be at least `min_size` pixels on each side after padding; the
    forward functions pad to `multiple_of` themselves and crop the output back.
    """

    name: str
    scale: int
    input_channels: int
    output_channels: int
    min_size: int
    multiple_of: int
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    forward: TileForward
    forward_fp32: TileForward | None = None


def supported_architectures() -> list[str]:
    """Return the names of the architectures spandrel can detect, sorted."""
    return sorted(
        {support.architecture.name for support in MAIN_REGISTRY.architectures()}
    )


def read_descriptor(path: Path) -> ImageModelDescriptor:
    """Load a checkpoint with spandrel on the CPU; raise ModelLoadError if it fails."""
    if not path.is_file():
        raise ModelLoadError(f"--model {path}: file not found")
    try:
        descriptor = ModelLoader(device="cpu").load_from_file(path)
    except UnsupportedModelError:
        raise ModelLoadError(
            f"--model {path}: spandrel does not recognise this checkpoint's "
            f"architecture; supported: {', '.join(supported_architectures())}"
        ) from None
    except (
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        AssertionError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as error:
        raise ModelLoadError(
            f"--model {path}: cannot load checkpoint ({error})"
        ) from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelLoadError(
            f"--model {path}: {descriptor.architecture.name} is not an image-to-image "
            "upscaler (it needs a mask); use a super-resolution checkpoint"
        )
    return descriptor.eval()


def choose_dtype(
    descriptor: ImageModelDescriptor, requested: str, device: torch.device
) -> torch.dtype:
    """Resolve --dtype for this model; reject a dtype its architecture cannot run.

    `auto` is fp32 on the CPU; on a GPU it is fp16, else bf16, else fp32, in the
    order the architecture supports them.
    """
    support = {
        torch.float32: True,
        torch.float16: descriptor.supports_half,
        torch.bfloat16: descriptor.supports_bfloat16,
    }
    if requested.strip().lower() == "auto":
        if device.type == "cpu":
            return torch.float32
        for dtype in (torch.float16, torch.bfloat16):
            if support[dtype] and (device.type != "cuda" or _cuda_runs(dtype)):
                return dtype
        return torch.float32
    dtype = resolve_dtype(requested, device)
    if not support[dtype]:
        usable = [dtype_name(d) for d, ok in support.items() if ok]
        raise InvalidInputError(
            f"--dtype {dtype_name(dtype)}: spandrel reports that "
            f"{descriptor.architecture.name} does not support it; use "
            f"{' or '.join(usable)}"
        )
    return dtype


def _cuda_runs(dtype: torch.dtype) -> bool:
    return dtype is not torch.bfloat16 or torch.cuda.is_bf16_supported()


def make_forward(descriptor: ImageModelDescriptor, channels_last: bool) -> TileForward:
    """Wrap a descriptor so that a non-finite raw output comes back as NaN.

    spandrel clamps outputs to [0, 1], which turns an fp16 overflow (inf) into a
    plausible white pixel. A forward hook receives the raw output first, and the tiles
    it flags are filled with NaN so the tiler's non-finite check catches them.
    """
    flags: dict[str, torch.Tensor] = {}
    if channels_last:
        descriptor.model.to(memory_format=torch.channels_last)

    def record_nonfinite(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            flags["nonfinite"] = ~torch.isfinite(output).flatten(1).all(dim=1)

    descriptor.model.register_forward_hook(record_nonfinite)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.inference_mode()
    def forward(tiles: torch.Tensor) -> torch.Tensor:
        flags.clear()
        output = descriptor(tiles.contiguous(memory_format=memory_format))
        nonfinite = flags.get("nonfinite")
        if nonfinite is not None and nonfinite.shape[0] == output.shape[0]:
            output[nonfinite] = float("nan")
        return output

    return forward


def _lazy_fp32_forward(
    descriptor: ImageModelDescriptor, device: torch.device, channels_last: bool
) -> TileForward:
    """Return an fp32 forward built on first use from a CPU copy of the weights.

    The copy is taken before the conversion to fp16 or bf16, because converting
    back would keep that rounding. It moves to the device only when a tile needs
    it, so a run without a failed tile keeps one copy of the model there.
    """
    cpu_copy = copy.deepcopy(descriptor)
    built: list[TileForward] = []

    def forward_fp32(tiles: torch.Tensor) -> torch.Tensor:
        if not built:
            built.append(make_forward(cpu_copy.to(device), channels_last))
        return built[0](tiles)

    return forward_fp32


def load_upscaler(
    path: str | Path,
    device: torch.device,
    dtype: str = "auto",
    channels_last: bool = False,
) -> Upscaler:
    """Load an upscaler checkpoint (.pth, .pt, .ckpt, .safetensors) for tiled runs.

    Raises ModelLoadError for a missing, corrupt or unrecognised checkpoint and
    InvalidInputError for a dtype the architecture does not support.
    """
    path = Path(path)
    descriptor = read_descriptor(path)
    torch_dtype = choose_dtype(descriptor, dtype, device)

    fp32_forward = None
    if torch_dtype is not torch.float32:
        fp32_forward = _lazy_fp32_forward(descriptor, device, channels_last)
    descriptor = descriptor.to(device=device, dtype=torch_dtype)

    requirements = descriptor.size_requirements
    logger.info(
        "loaded %s x%d (%s) on %s in %s",
        descriptor.architecture.name,
        descriptor.scale,
        path.name,
        device,
        dtype_name(torch_dtype),
    )
    return Upscaler(
        name=descriptor.architecture.name,
        scale=descriptor.scale,
        input_channels=descriptor.input_channels,
        output_channels=descriptor.output_channels,
        min_size=requirements.minimum,
        multiple_of=requirements.multiple_of,
        device=device,
        dtype=torch_dtype,
        channels_last=channels_last,
        forward=make_forward(descriptor, channels_last),
        forward_fp32=fp32_forward,
    )
