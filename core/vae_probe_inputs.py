"""Load what a VAE probe decodes: latents from a file or a replayed render, and VAEs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from renderqa.core.errors import InvalidInputError, ModelLoadError


def read_latents_file(path: Path) -> tuple[torch.Tensor, dict]:
    """Read `render --save-latents` output: the "latents" tensor and its metadata.

    Returns the tensor as stored and the parsed "renderqa" metadata ({} when absent).
    Raises InvalidInputError for a missing, unreadable or tensor-less file.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InvalidInputError(f"{path}: latents file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "latents" not in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                raise InvalidInputError(
                    f"{path}: no tensor named 'latents' (found: "
                    f"{', '.join(handle.keys()) or 'none'}); pass a file written by "
                    "render --save-latents"
                )
            latents = handle.get_tensor("latents")
    except SafetensorError as error:
        raise InvalidInputError(
            f"{path}: not a readable safetensors file ({error})"
        ) from None
    try:
        parameters = json.loads(metadata.get("renderqa", "{}"))
    except ValueError:
        raise InvalidInputError(
            f"{path}: the 'renderqa' metadata is not valid JSON"
        ) from None
    return latents, parameters if isinstance(parameters, dict) else {}


def replay_render(
    parameters: dict,
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Render again from a renderqa parameters record; return the final latents.

    `parameters` is the JSON that render stores in a PNG (prompt, seed, steps, size,
    guidance, threshold, model, vae, scheduler, dtype). `model` and `dtype` replace
    the recorded ones. Latents come back (1, C, h, w) in the UNet's space, on the CPU.
    """
    from renderqa.core.pipeline import load_pipeline
    from renderqa.core.render import (
        RenderRequest,
        ThresholdSettings,
        check_request,
        render_batch,
    )

    model = model or parameters.get("model")
    missing = [key for key in ("prompt", "seed") if key not in parameters]
    if not model:
        missing.append("model")
    if missing:
        raise InvalidInputError(
            f"the render record lacks {', '.join(missing)}, so it cannot be replayed; "
            "pass the .latents.safetensors file instead"
        )
    threshold = parameters.get("threshold")
    request = RenderRequest(
        prompt=parameters["prompt"],
        seed=int(parameters["seed"]),
        negative_prompt=parameters.get("negative_prompt") or "",
        steps=int(parameters.get("steps", 30)),
        width=parameters.get("width"),
        height=parameters.get("height"),
        guidance_scale=float(parameters.get("guidance_scale", 7.5)),
        guidance_rescale=float(parameters.get("guidance_rescale", 0.0)),
        threshold=ThresholdSettings(**threshold) if threshold else None,
    )
    check_request(request)
    loaded = load_pipeline(
        model,
        vae=parameters.get("vae"),
        device=device,
        dtype=dtype or parameters.get("dtype") or "auto",
        scheduler=parameters.get("scheduler") or "default",
    )
    result = render_batch(loaded, [request], progress=progress)[0]
    return result.latents


def load_probe_vae(source: str, option: str):
    """Load the AutoencoderKL of `source` in fp32 on the CPU.

    `source` is a diffusers pipeline folder (its vae/ subfolder is used), a VAE
    folder, a VAE or full single-file checkpoint, or a Hugging Face repo id of
    either kind.
    """
    from diffusers import AutoencoderKL

    from renderqa.core.pipeline import load_pipeline, load_vae

    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            return AutoencoderKL.from_pretrained(
                path, subfolder="vae", torch_dtype=torch.float32
            ).eval()
        if path.is_file() and _is_full_checkpoint(path):
            return load_pipeline(source, device="cpu", dtype="fp32").pipe.vae.eval()
        if not path.exists() and _cached_pipeline(source):
            return AutoencoderKL.from_pretrained(
                source,
                subfolder="vae",
                torch_dtype=torch.float32,
                local_files_only=True,
            ).eval()
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{option} {source}: cannot load its VAE ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from None
    return load_vae(source, torch.float32).eval()


def _is_full_checkpoint(path: Path) -> bool:
    from renderqa.core.pipeline import detect_checkpoint_kind

    try:
        detect_checkpoint_kind(path)
    except ModelLoadError:
        return False
    return True


def _cached_pipeline(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except HFValidationError:
        return False
