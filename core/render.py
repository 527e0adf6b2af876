"""Rendering with renderqa's guidance: CFG, guidance rescale and dynamic
thresholding applied inside a stock diffusers SD / SDXL pipeline.

How it hooks in: a forward hook on the UNet receives the batched [uncond, cond]
prediction, applies renderqa's guidance per sample, and returns the guided
prediction in both halves. diffusers then computes uncond + w * (cond - uncond)
= g + w * 0 = g exactly, and its own rescale is switched off (guidance_rescale=0),
so everything else (prompt encoding, SDXL size conditioning, latents, scheduler
steps) is diffusers' own code.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from renderqa.core.atomic import atomic_path
from renderqa.core.devices import dtype_name
from renderqa.core.errors import InvalidInputError
from renderqa.core.guidance import (
    combine_cfg,
    denoised_from_output,
    output_from_denoised,
    per_sample,
    rescale_guidance,
    saturated_fraction,
    std_ratio,
    threshold_pixel,
    threshold_to_reference,
)
from renderqa.core.imageio import save_png, to_uint8
from renderqa.core.pipeline import LoadedPipeline
from renderqa.core.schedulers import SCHEDULERS

logger = logging.getLogger(__name__)

THRESHOLD_MODES = ("latent", "pixel")
BLACK_LEVEL = 2 / 255  # an image whose brightest value is below this decoded black


@dataclass(frozen=True)
class ThresholdSettings:
    """Dynamic thresholding settings; see core.guidance for the two modes."""

    mode: str  # "latent": relative to a mimic-scale reference; "pixel": Imagen's rule
    percentile: float = 0.995
    mimic_scale: float | None = None
    per_channel: bool = False


@dataclass(frozen=True)
class RenderRequest:
    """Everything that decides one image, besides the loaded pipeline."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 30
    width: int | None = None
    height: int | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    threshold: ThresholdSettings | None = None


@dataclass
class RenderResult:
    """One rendered image, its diagnostics and the parameters that reproduce it."""

    request: RenderRequest
    image: Image.Image
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1], decoded, before quantising
    latents: torch.Tensor  # (1, C, h, w) on the CPU, before VAE scaling is undone
    std_ratio: float | None  # mean over steps of std(final guided) / std(cond)
    std_ratio_cfg: float | None  # the same for plain CFG, before rescale/threshold
    saturated_fraction: float
    finite: bool
    black: bool
    seconds: float
    vae_fallback: str | None
    parameters: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if not self.finite:
            return "non-finite"
        return "black" if self.black else "ok"


def check_request(request: RenderRequest) -> None:
    """Validate one request's numbers; raise InvalidInputError naming the option."""
    if request.steps < 1:
        raise InvalidInputError(f"--steps {request.steps} must be at least 1")
    for option, value in (("--width", request.width), ("--height", request.height)):
        if value is not None and (value < 8 or value % 8):
            raise InvalidInputError(
                f"{option} {value} must be a positive multiple of 8, e.g. "
                f"{max(8, round(value / 8) * 8)}"
            )
    if not 0.0 <= request.guidance_rescale <= 1.0:
        raise InvalidInputError(
            f"--guidance-rescale {request.guidance_rescale} must be in [0, 1]; "
            "0.7 is the value recommended by Lin et al. 2023"
        )
    if request.guidance_scale < 0 or not math.isfinite(request.guidance_scale):
        raise InvalidInputError(
            f"--guidance-scale {request.guidance_scale} must be a finite number >= 0"
        )
    threshold = request.threshold
    if threshold is None:
        return
    if threshold.mode not in THRESHOLD_MODES:
        raise InvalidInputError(
            f"--threshold-mode {threshold.mode!r} is unknown; use off, "
            f"{', '.join(THRESHOLD_MODES)}"
        )
    if not 0.0 < threshold.percentile <= 1.0:
        raise InvalidInputError(
            f"--threshold-percentile {threshold.percentile} must be in (0, 1], e.g. 0.995"
        )
    if threshold.mode == "latent":
        mimic = threshold.mimic_scale
        if mimic is None or mimic <= 0 or not math.isfinite(mimic):
            raise InvalidInputError(
                f"--mimic-scale {mimic} must be a positive number with "
                "--threshold-mode latent, e.g. 7 for a guidance scale of 12"
            )


def vp_coefficients(scheduler, timestep: torch.Tensor) -> tuple[float, float]:
    """Return (alpha, sigma) with x_t = alpha * x0 + sigma * noise for the UNet input.

    Sigma-based schedulers (Euler, DPM-Solver, UniPC) store the variance-exploding
    sigma s of the current step and feed the UNet x / sqrt(1 + s^2), so alpha =
    1 / sqrt(1 + s^2). DDIM-style schedulers index alphas_cumprod by timestep.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = scheduler.index_for_timestep(timestep)
        s = float(sigmas[index])
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return alpha, s * alpha
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


class GuidanceHook:
    """UNet forward hook that applies per-sample guidance and records std ratios."""

    def __init__(
        self, requests: Sequence[RenderRequest], scheduler, prediction_type: str
    ):
        self.requests = list(requests)
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.ratio_sums = np.zeros(len(self.requests))
        self.cfg_ratio_sums = np.zeros(len(self.requests))
        self.steps = 0

    def __call__(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        noise_pred = output[0] if isinstance(output, tuple) else output.sample
        noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)

        scales = per_sample([r.guidance_scale for r in self.requests], noise_pred_cond)
        guided = combine_cfg(noise_pred_uncond, noise_pred_cond, scales)
        cfg_ratio = std_ratio(guided, noise_pred_cond)

        rescales = [r.guidance_rescale for r in self.requests]
        if any(rescales):
            guided = rescale_guidance(
                guided,
                noise_pred_cond,
                per_sample(rescales, guided),
                per_sample([1 - phi for phi in rescales], guided),
            )
        if any(r.threshold is not None for r in self.requests):
            latents = sample.chunk(2)[0]
            guided = self._threshold(
                guided, noise_pred_uncond, noise_pred_cond, latents, timestep
            )

        self.cfg_ratio_sums += cfg_ratio.double().cpu().numpy()
        self.ratio_sums += std_ratio(guided, noise_pred_cond).double().cpu().numpy()
        self.steps += 1
        doubled = torch.cat([guided, guided])
        if isinstance(output, tuple):
            return (doubled, *output[1:])
        output.sample = doubled
        return output

    def _threshold(self, guided, noise_pred_uncond, noise_pred_cond, latents, timestep):
        alpha, sigma = vp_coefficients(self.scheduler, timestep)
        kind = self.prediction_type
        rows = []
        for index, request in enumerate(self.requests):
            row = guided[index : index + 1]
            settings = request.threshold
            if settings is None:
                rows.append(row)
                continue
            x_t = latents[index : index + 1]
            denoised = denoised_from_output(row, x_t, alpha, sigma, kind)
            if settings.mode == "pixel":
                bounded = threshold_pixel(denoised, settings.percentile)
            else:
                reference = self._mimic_reference(
                    request,
                    noise_pred_uncond[index : index + 1],
                    noise_pred_cond[index : index + 1],
                )
                reference_x0 = denoised_from_output(reference, x_t, alpha, sigma, kind)
                bounded = threshold_to_reference(
                    denoised, reference_x0, settings.percentile, settings.per_channel
                )
            if torch.equal(bounded, denoised):
                # Nothing was clamped: keep the prediction bit for bit rather than
                # round-tripping it through x0.
                rows.append(row)
            else:
                rows.append(output_from_denoised(bounded, x_t, alpha, sigma, kind))
        return torch.cat(rows)

    @staticmethod
    def _mimic_reference(request, noise_pred_uncond, noise_pred_cond):
        """Compute the prediction at the mimic scale with the guided one's rescale.

        Sharing the rescale makes a mimic scale equal to the guidance scale
        reproduce the guided prediction exactly.
        """
        reference = combine_cfg(
            noise_pred_uncond,
            noise_pred_cond,
            per_sample([request.threshold.mimic_scale], noise_pred_cond),
        )
        phi = request.guidance_rescale
        if phi:
            reference = rescale_guidance(
                reference,
                noise_pred_cond,
                per_sample([phi], reference),
                per_sample([1 - phi], reference),
            )
        return reference

    def mean_ratios(self) -> tuple[list[float], list[float]]:
        steps = max(self.steps, 1)
        return (self.ratio_sums / steps).tolist(), (
            self.cfg_ratio_sums / steps
        ).tolist()


def _check_batch(requests: Sequence[RenderRequest]) -> None:
    if not requests:
        raise InvalidInputError("render_batch needs at least one request")
    first = requests[0]
    shared = ("prompt", "negative_prompt", "steps", "width", "height")
    for request in requests[1:]:
        for name in shared:
            if getattr(request, name) != getattr(first, name):
                raise InvalidInputError(
                    f"requests of one batch must share {name}: {getattr(first, name)!r} "
                    f"vs {getattr(request, name)!r}"
                )
    if len({r.guidance_scale > 1 for r in requests}) > 1:
        raise InvalidInputError(
            "requests of one batch must all have guidance_scale > 1 or all <= 1"
        )
    for request in requests:
        check_request(request)


def _encode_prompt(
    loaded: LoadedPipeline, prompt: str, negative: str, do_cfg: bool
) -> dict:
    """Encode a prompt once per (prompt, negative, CFG on/off) and cache it."""
    key = (prompt, negative, do_cfg)
    if key in loaded.embedding_cache:
        return loaded.embedding_cache[key]
    pipe = loaded.pipe
    # An empty negative prompt is passed as None, so SDXL's force_zeros_for_empty_prompt
    # applies exactly as in a plain diffusers call without a negative prompt.
    negative_prompt = negative or None
    with torch.no_grad():
        if loaded.kind == "sdxl":
            embeds = pipe.encode_prompt(
                prompt=prompt,
                device=loaded.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt,
            )
            names = (
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
            )
        else:
            embeds = pipe.encode_prompt(
                prompt,
                loaded.device,
                1,
                do_cfg,
                negative_prompt=negative_prompt,
            )
            names = ("prompt_embeds", "negative_prompt_embeds")
    encoded = {
        name: value
        for name, value in zip(names, embeds, strict=True)
        if value is not None
    }
    loaded.embedding_cache[key] = encoded
    return encoded


def decode_latents(
    loaded: LoadedPipeline, latents: torch.Tensor
) -> tuple[torch.Tensor, list[bool], str, list[int]]:
    """Decode latents to (B, 3, H, W) float32 in [0, 1] on the CPU.

    The decode dtype is --vae-dtype when given; otherwise it follows diffusers: SDXL
    pipelines upcast an fp16 VAE with force_upcast to fp32, SD 1.x/2.x never do.
    Samples that decode to non-finite values are decoded again in fp32 (logged).
    Returns (images, finite flags, decode dtype name, indices decoded again in fp32).
    """
    vae = loaded.pipe.vae
    original_dtype = vae.dtype
    decode_dtype = loaded.vae_dtype or original_dtype
    upcast = loaded.kind == "sdxl" and vae.config.get("force_upcast", False)
    if loaded.vae_dtype is None and upcast and original_dtype == torch.float16:
        decode_dtype = torch.float32

    images = _decode_in(vae, latents, decode_dtype)
    finite = [bool(torch.isfinite(image).all()) for image in images]
    redone_indices: list[int] = []
    if not all(finite) and decode_dtype != torch.float32:
        bad = [index for index, ok in enumerate(finite) if not ok]
        logger.warning(
            "VAE decode in %s gave non-finite values for %d image(s); decoding them "
            "again in fp32",
            dtype_name(decode_dtype),
            len(bad),
        )
        redone = _decode_in(vae, latents[bad], torch.float32)
        images[bad] = redone.to(images.dtype)
        finite = [bool(torch.isfinite(image).all()) for image in images]
        redone_indices = bad
    if vae.dtype != original_dtype:
        vae.to(dtype=original_dtype)
    pixels = (images / 2 + 0.5).clamp(0, 1).float().cpu()
    return pixels, finite, dtype_name(decode_dtype), redone_indices


def _decode_in(vae, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if vae.dtype != dtype:
        vae.to(dtype=dtype)
    config = vae.config
    latents = latents.to(dtype=dtype, device=vae.device)
    mean = config.get("latents_mean")
    std = config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    # Autocast would silently override the decode dtype (and bring back fp16 NaNs).
    with torch.no_grad(), torch.autocast(latents.device.type, enabled=False):
        return vae.decode(latents, return_dict=False)[0]


def render_batch(
    loaded: LoadedPipeline,
    requests: Sequence[RenderRequest],
    progress: Callable[[int, int], None] | None = None,
) -> list[RenderResult]:
    """Render a batch of requests in one pipeline call (one UNet batch).

    Requests share prompt, negative prompt, steps and size, and are all CFG-on
    (guidance_scale > 1) or all CFG-off; seed, guidance scale, rescale and
    thresholding may differ. Each seed draws its initial noise from its own CPU
    torch.Generator, so an image does not depend on its batch neighbours' seeds.
    `progress(step, total)` is called after every denoising step.
    """
    _check_batch(requests)
    first = requests[0]
    pipe = loaded.pipe
    width = first.width or loaded.default_size
    height = first.height or loaded.default_size
    do_cfg = first.guidance_scale > 1
    count = len(requests)

    # 1. Prompt embeddings, computed once per prompt and reused across batches.
    embeds = _encode_prompt(loaded, first.prompt, first.negative_prompt, do_cfg)

    # 2. Denoise with the guidance hook on the UNet.
    hook = GuidanceHook(requests, pipe.scheduler, loaded.prediction_type)
    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True) if do_cfg else None

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if progress is not None:
            progress(step + 1, first.steps)
        return callback_kwargs

    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
    start = time.perf_counter()
    try:
        with torch.no_grad():
            latents = pipe(
                num_inference_steps=first.steps,
                width=width,
                height=height,
                guidance_scale=first.guidance_scale,
                guidance_rescale=0.0,
                num_images_per_prompt=count,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step_end,
                **embeds,
            ).images
    finally:
        if handle is not None:
            handle.remove()

    # 3. Decode, check health, and measure.
    pixels, finite, decode_dtype, redone = decode_latents(loaded, latents)
    seconds = (time.perf_counter() - start) / count
    ratios, cfg_ratios = (
        hook.mean_ratios() if do_cfg else ([None] * count, [None] * count)
    )
    results = []
    for index, request in enumerate(requests):
        image_pixels = pixels[index].permute(1, 2, 0).numpy()
        clean = np.nan_to_num(image_pixels, nan=0.0)
        result = RenderResult(
            request=request,
            image=Image.fromarray(to_uint8(clean)),
            pixels=clean,
            latents=latents[index : index + 1].detach().float().cpu(),
            std_ratio=ratios[index],
            std_ratio_cfg=cfg_ratios[index],
            saturated_fraction=saturated_fraction(clean),
            finite=finite[index],
            black=bool(clean.max() < BLACK_LEVEL),
            seconds=seconds,
            vae_fallback="fp32" if index in redone else None,
        )
        result.parameters = render_parameters(
            loaded, result, width, height, decode_dtype
        )
        results.append(result)
    return results


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def render_parameters(
    loaded: LoadedPipeline,
    result: RenderResult,
    width: int,
    height: int,
    vae_dtype: str,
) -> dict:
    """The JSON record stored in each PNG: settings, model, versions and diagnostics.

    It contains no timings or paths of this run, so the same render gives the same bytes.
    """
    request = result.request
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "steps": request.steps,
        "width": width,
        "height": height,
        "guidance_scale": request.guidance_scale,
        "guidance_rescale": request.guidance_rescale,
        "rescale_space": f"model output ({loaded.prediction_type})",
        "threshold": asdict(request.threshold) if request.threshold else None,
        "cfg_active": request.guidance_scale > 1,
        "model": loaded.model_id,
        "model_kind": loaded.kind,
        "vae": loaded.vae_id,
        "scheduler": loaded.scheduler_name,
        "scheduler_class": type(loaded.pipe.scheduler).__name__,
        "prediction_type": loaded.prediction_type,
        "dtype": dtype_name(loaded.dtype),
        "vae_dtype": vae_dtype,
        "vae_fallback": result.vae_fallback,
        "vae_scaling_factor": loaded.pipe.vae.config.scaling_factor,
        "vae_shift_factor": loaded.pipe.vae.config.get("shift_factor"),
        "device_type": loaded.device.type,
        "channels_last": loaded.channels_last,
        "std_ratio": result.std_ratio,
        "std_ratio_cfg": result.std_ratio_cfg,
        "saturated_fraction": result.saturated_fraction,
        "status": result.status,
        "versions": {
            "renderqa": _version("renderqa"),
            "diffusers": _version("diffusers"),
            "torch": torch.__version__,
        },
    }


def a1111_parameters(parameters: dict) -> str:
    """Format parameters as the `parameters` text chunk A1111 and its readers parse."""
    entry = SCHEDULERS.get(parameters["scheduler"])
    fields = [
        f"Steps: {parameters['steps']}",
        f"Sampler: {entry.a1111_sampler if entry else parameters['scheduler']}",
        f"Schedule type: {entry.a1111_schedule if entry else 'Automatic'}",
        f"CFG scale: {parameters['guidance_scale']}",
        f"Seed: {parameters['seed']}",
        f"Size: {parameters['width']}x{parameters['height']}",
        f"Model: {Path(parameters['model']).name}",
        f"CFG Rescale phi: {parameters['guidance_rescale']}",
    ]
    threshold = parameters.get("threshold")
    if threshold:
        fields.append(
            f"Dynamic thresholding: {threshold['mode']} p={threshold['percentile']}"
            + (
                f" mimic={threshold['mimic_scale']}"
                if threshold["mode"] == "latent"
                else ""
            )
        )
    fields.append(f"Version: renderqa {parameters['versions']['renderqa']}")
    lines = [parameters["prompt"]]
    if parameters["negative_prompt"]:
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_render(result: RenderResult, path: str | Path) -> None:
    """Write the image as a PNG with `parameters` (A1111 text) and `renderqa` (JSON)."""
    text = {
        "parameters": a1111_parameters(result.parameters),
        "renderqa": json.dumps(result.parameters, sort_keys=True),
    }
    save_png(path, result.image, text=text)


def save_latents(result: RenderResult, path: str | Path) -> None:
    """Write the final latents as safetensors with the parameters JSON as metadata."""
    from safetensors.torch import save_file

    tensor = result.latents.contiguous()
    metadata = {"renderqa": json.dumps(result.parameters, sort_keys=True)}
    with atomic_path(path) as tmp_path:
        save_file({"latents": tensor}, str(tmp_path), metadata=metadata)
