"""Loading SD 1.x/2.x and SDXL pipelines the way users hold them.

A model is one of: a Hugging Face repo id (resolved through the local cache, or
downloaded when the hub is reachable), a local diffusers folder (with
model_index.json), or a single-file `.safetensors` / `.ckpt` checkpoint in the
original (LDM) key layout, loaded through diffusers' `from_single_file`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from renderqa.core.devices import dtype_name, resolve_device, resolve_dtype
from renderqa.core.errors import ModelLoadError
from renderqa.core.schedulers import build_scheduler

logger = logging.getLogger(__name__)

PIPELINE_KINDS = {
    "StableDiffusionXLPipeline": ("sdxl", StableDiffusionXLPipeline),
    "StableDiffusionPipeline": ("sd", StableDiffusionPipeline),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# One key that only each family's checkpoints contain (diffusers 0.42 uses the same
# markers in single_file_utils.CHECKPOINT_KEY_NAMES).
SDXL_MARKER = "conditioner.embedders.1.model."
SDXL_REFINER_MARKER = "conditioner.embedders.0.model."
SD1_MARKER = "cond_stage_model.transformer."
SD2_MARKER = "cond_stage_model.model."
UNET_MARKER = "model.diffusion_model."


@dataclass
class LoadedPipeline:
    """A pipeline ready to render, with what was loaded and how, for the records."""

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    kind: str  # "sdxl" or "sd"
    model_id: str
    vae_id: str | None
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype | None  # None: decide per decode as diffusers does
    scheduler_name: str
    channels_last: bool
    embedding_cache: dict = field(default_factory=dict, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor


def _looks_like_path(model: str) -> bool:
    """True for strings that can only be a path: a repo id is `owner/name`."""
    return (
        model.startswith((".", "/", "~"))
        or model.endswith(SINGLE_FILE_SUFFIXES)
        or model.count("/") > 1
        or "\\" in model
    )


def _checkpoint_keys(path: Path) -> list[str]:
    """Read the tensor names of a single-file checkpoint without loading the weights."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # safetensors and torch raise several unrelated types
        raise ModelLoadError(
            f"--model {path}: cannot read the checkpoint ({error.__class__.__name__}: "
            f"{error}); check that the file is complete"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"--model {path}: the checkpoint contains no state dict; pass a full SD or SDXL checkpoint"
        )
    return list(state)


def detect_checkpoint_kind(path: Path) -> str:
    """Return "sdxl" or "sd" from a single-file checkpoint's key names."""
    keys = _checkpoint_keys(path)
    has_unet = any(key.startswith(UNET_MARKER) for key in keys)
    if has_unet and any(key.startswith(SDXL_MARKER) for key in keys):
        return "sdxl"
    if has_unet and any(key.startswith((SD1_MARKER, SD2_MARKER)) for key in keys):
        return "sd"
    refiner = any(key.startswith(SDXL_REFINER_MARKER) for key in keys)
    example = keys[0] if keys else "no tensors at all"
    what = "an SDXL refiner" if refiner else f"not SD or SDXL (first key: {example!r})"
    raise ModelLoadError(
        f"--model {path}: unsupported checkpoint, {what}; renderqa renders SD 1.x, "
        "SD 2.x and SDXL base checkpoints"
    )


def _pipeline_class_from_index(index_path: Path, model: str):
    try:
        class_name = json.loads(index_path.read_text("utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"--model {model}: unreadable model_index.json ({error})"
        ) from None
    if class_name not in PIPELINE_KINDS:
        raise ModelLoadError(
            f"--model {model}: unsupported pipeline {class_name}; renderqa renders "
            f"{' and '.join(PIPELINE_KINDS)} models"
        )
    return PIPELINE_KINDS[class_name]


def _load_folder(model: str, folder: Path, dtype: torch.dtype):
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(
            f"--model {model}: folder has no model_index.json, so it is not a diffusers "
            "pipeline; pass the pipeline's root folder, a repo id or a .safetensors file"
        )
    kind, pipeline_class = _pipeline_class_from_index(index_path, model)
    try:
        pipe = pipeline_class.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"--model {model}: cannot load the pipeline ({error})"
        ) from None
    return kind, pipe


def _load_repo(model: str, dtype: torch.dtype):
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(
            f"--model {model!r} is neither an existing path nor a valid Hugging Face "
            "repo id (owner/name); check the spelling"
        ) from None
    cached_index = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached_index, str):
        if hub_constants.HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"--model {model}: not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
                f"and HF_HUB_OFFLINE is set; run `hf download {model}` on a machine with "
                "network access into that cache, or pass a local diffusers folder"
            )
        logger.info("%s is not cached; downloading it from the Hugging Face hub", model)
        return _download_repo(model, dtype)
    kind, pipeline_class = _pipeline_class_from_index(Path(cached_index), model)
    try:
        pipe = pipeline_class.from_pretrained(model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"--model {model}: the cached copy is incomplete ({error}); run "
            f"`hf download {model}` again"
        ) from None
    return kind, pipe


def _download_repo(model: str, dtype: torch.dtype):
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(model, "model_index.json")
        kind, pipeline_class = _pipeline_class_from_index(Path(index_path), model)
        return kind, pipeline_class.from_pretrained(model, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as error:  # network, auth and not-found errors of several kinds
        raise ModelLoadError(
            f"--model {model}: download from the Hugging Face hub failed "
            f"({error.__class__.__name__}); check the repo id, HF_TOKEN for gated "
            "models, and the network, or pass a local folder"
        ) from None


def _load_single_file(model: str, path: Path, config: str | None, dtype: torch.dtype):
    kind = detect_checkpoint_kind(path)
    pipeline_class = (
        StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    )
    kwargs: dict = {"dtype": dtype}
    if config is not None:
        kwargs["config"] = config
    if hub_constants.HF_HUB_OFFLINE:
        kwargs["local_files_only"] = True
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as error:  # diffusers raises OSError, ValueError or hub errors
        suggestion = _default_config_for(path)
        raise ModelLoadError(
            f"--model {path}: loading the single-file checkpoint failed "
            f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]}); it needs "
            f"the component configs of {suggestion}: pass --config with a local diffusers "
            "folder of the same architecture, or a repo id in the Hugging Face cache"
        ) from None
    return kind, pipe


def _default_config_for(path: Path) -> str:
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        keys = dict.fromkeys(_checkpoint_keys(path), None)
        return fetch_diffusers_config(keys)["pretrained_model_name_or_path"]
    except Exception:  # only used to word a suggestion; fall back to a generic one
        return "the matching base model"


def load_vae(vae: str, dtype: torch.dtype) -> AutoencoderKL:
    """Load a separate VAE from a diffusers folder, a single file or a repo id."""
    path = Path(vae).expanduser()
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, dtype=dtype)
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), dtype=dtype)
        if _looks_like_path(vae):
            raise ModelLoadError(f"--vae {vae}: no such file or folder")
        validate_repo_id(vae)
        return AutoencoderKL.from_pretrained(
            vae, dtype=dtype, local_files_only=hub_constants.HF_HUB_OFFLINE
        )
    except ModelLoadError:
        raise
    except HFValidationError:
        raise ModelLoadError(
            f"--vae {vae!r}: not a path and not a valid repo id"
        ) from None
    except Exception as error:  # several loader error types; all mean "cannot load"
        raise ModelLoadError(
            f"--vae {vae}: cannot load an AutoencoderKL ({error.__class__.__name__}); "
            "pass a diffusers VAE folder, a VAE .safetensors file or a cached repo id"
        ) from None


def load_pipeline(
    model: str,
    *,
    vae: str | None = None,
    config: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    vae_dtype: str = "auto",
    scheduler: str = "default",
    channels_last: bool = False,
) -> LoadedPipeline:
    """Load `model` (repo id, diffusers folder or single file) onto a device.

    Steps: resolve device and dtypes, load the pipeline, swap in a separate VAE, set
    the scheduler, then move to the device. Raises ModelLoadError with the fix for
    anything that cannot be resolved or read.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    decode_dtype = (
        None
        if vae_dtype == "auto"
        else resolve_dtype(vae_dtype, torch_device, "--vae-dtype")
    )

    path = Path(model).expanduser()
    if path.is_dir():
        kind, pipe = _load_folder(model, path, torch_dtype)
    elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        kind, pipe = _load_single_file(model, path, config, torch_dtype)
    elif path.is_file():
        raise ModelLoadError(
            f"--model {model}: unsupported file type {path.suffix or '(none)'}; pass a "
            ".safetensors or .ckpt checkpoint, a diffusers folder or a repo id"
        )
    elif _looks_like_path(model):
        raise ModelLoadError(f"--model {model}: no such file or folder")
    else:
        kind, pipe = _load_repo(model, torch_dtype)

    if vae is not None:
        pipe.vae = load_vae(vae, torch_dtype)
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch_device)
    if decode_dtype is not None:
        pipe.vae.to(dtype=decode_dtype)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    logger.info(
        "loaded %s (%s) on %s in %s",
        model,
        kind,
        torch_device,
        dtype_name(torch_dtype),
    )
    return LoadedPipeline(
        pipe=pipe,
        kind=kind,
        model_id=model,
        vae_id=vae,
        device=torch_device,
        dtype=torch_dtype,
        vae_dtype=decode_dtype,
        scheduler_name=scheduler,
        channels_last=channels_last,
    )
