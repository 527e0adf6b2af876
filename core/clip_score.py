"""CLIP image-text similarity with open_clip, loaded once and scored in batches.

The score is the raw cosine between L2-normalised image and text embeddings, in
[-1, 1] (about 0.15 to 0.40 for matching pairs with public checkpoints). Tools
such as torchmetrics report 100 * max(cos, 0) instead; derive that from the raw
value if needed.

Where the model comes from (`model`, `pretrained`):
- a built-in open_clip name with a pretrained tag, e.g. ViT-B-32 / laion2b_s34b_b79k:
  the weights must already be in the Hugging Face cache; nothing is downloaded;
- a built-in name, or a path to an open_clip model config JSON, with `pretrained`
  naming a local checkpoint file: the same loading path a downloaded tag takes;
- `local-dir:FOLDER` (or a folder path) holding open_clip_config.json and weights.

Resize modes: `crop` is open_clip's eval default, which resizes the shortest side
and then centre-crops, so it drops about a third of a 1216x832 render. `pad`
resizes the longest side and pads, so the whole image is seen. `squash` resizes to
the square input without keeping the aspect ratio.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from renderqa.core.errors import InvalidInputError, ModelLoadError

logger = logging.getLogger(__name__)

# renderqa's resize mode -> open_clip's `image_resize_mode`.
RESIZE_MODES = {"crop": "shortest", "pad": "longest", "squash": "squash"}
LOCAL_DIR_PREFIX = "local-dir:"
LOCAL_CONFIG_NAME = "open_clip_config.json"
COMMON_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14")


@dataclass
class ClipScorer:
    """A loaded open_clip model with its eval transform and tokenizer.

    `score` takes PIL RGB images and captions and returns raw cosines; caption
    embeddings are cached per text, so each prompt is encoded once per run.
    """

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device
    model_name: str
    pretrained: str
    resize_mode: str
    batch_size: int = 32
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def caption_truncated(self, text: str) -> bool | None:
        """Return whether `text` is over the context length (None if unknown)."""
        count = count_tokens(self.tokenizer, text)
        return None if count is None else count > self.context_length

    @torch.inference_mode()
    def text_features(self, text: str) -> torch.Tensor:
        """Return the normalised embedding (D,) of one caption, computing it once."""
        if text not in self._text_cache:
            tokens = self.tokenizer([text]).to(self.device)
            features = self.model.encode_text(tokens).float()
            features = features / features.norm(dim=-1, keepdim=True)
            self._text_cache[text] = features[0]
            if self.caption_truncated(text):
                logger.warning(
                    "caption over the CLIP context length of %d tokens is truncated "
                    "for scoring: %.60s...",
                    self.context_length,
                    text,
                )
        return self._text_cache[text]

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Return normalised embeddings (N, D) of RGB images, in batches."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [
                    self.preprocess(image)
                    for image in images[start : start + self.batch_size]
                ]
            ).to(self.device)
            features = self.model.encode_image(batch).float()
            chunks.append(features / features.norm(dim=-1, keepdim=True))
        return torch.cat(chunks)

    def score(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """Return the raw cosine of each image with its caption."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} captions")
        if not images:
            return []
        image_features = self.image_features(images)
        text_features = torch.stack([self.text_features(text) for text in texts])
        cosines = (image_features * text_features).sum(dim=-1)
        return [float(value) for value in cosines.cpu()]

    def timed_score(
        self, images: list[Image.Image], texts: list[str]
    ) -> tuple[list[float], float]:
        """Score like `score` and also return the wall-clock seconds it took."""
        start = time.perf_counter()
        cosines = self.score(images, texts)
        return cosines, time.perf_counter() - start


def count_tokens(tokenizer: object, text: str) -> int | None:
    """Count the tokens of `text` including start and end tokens, before truncation."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode) and hasattr(tokenizer, "sot_token_id"):
        # open_clip's SimpleTokenizer: BPE ids without the start and end tokens.
        return len(encode(text)) + 2
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if hf_tokenizer is not None and callable(hf_tokenizer):
        clean = getattr(tokenizer, "clean_fn", lambda value: value)
        return len(hf_tokenizer(clean(text))["input_ids"])
    return None


def load_clip_scorer(
    model: str,
    pretrained: str | None,
    resize_mode: str = "pad",
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> ClipScorer:
    """Load an open_clip model, its transform (in `resize_mode`) and tokenizer.

    Raises InvalidInputError for an unknown model, tag or resize mode, and
    ModelLoadError for weights that are absent (with how to get them) or broken.
    """
    import open_clip

    if resize_mode not in RESIZE_MODES:
        raise InvalidInputError(
            f"--clip-resize {resize_mode!r} is unknown; use one of "
            f"{', '.join(RESIZE_MODES)}"
        )
    device = torch.device(device)
    model_name, pretrained_source, extra = _resolve_source(open_clip, model, pretrained)
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained_source,
            device=device,
            image_resize_mode=RESIZE_MODES[resize_mode],
            **extra,
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, FileNotFoundError, OSError, KeyError) as error:
        raise ModelLoadError(
            f"cannot load CLIP model {model!r} with pretrained {pretrained!r}: "
            f"{_first_line(error)}"
        ) from None
    clip_model.eval()
    return ClipScorer(
        model=clip_model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        model_name=model,
        pretrained=pretrained or "",
        resize_mode=resize_mode,
        batch_size=batch_size,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _resolve_source(open_clip, model: str, pretrained: str | None):
    """Map the user's model and pretrained values to create_model arguments.

    Returns (model_name, pretrained path or None, extra keyword arguments).
    """
    local_dir = _local_dir(model)
    if local_dir is not None:
        if pretrained:
            logger.warning(
                "--clip-pretrained %s is ignored because %s contains its own weights",
                pretrained,
                local_dir,
            )
        return f"{LOCAL_DIR_PREFIX}{local_dir}", None, {}

    name = model
    if model.endswith(".json"):
        name = _register_config_file(open_clip, Path(model))
    elif name.replace("/", "-") not in open_clip.list_models():
        raise InvalidInputError(_unknown_model_message(open_clip, model))

    if not pretrained:
        raise InvalidInputError(
            f"--clip-pretrained is missing for {model}; give a tag (one of "
            f"{_tags_text(open_clip, name)}) or a local checkpoint file"
        )
    if os.path.isfile(pretrained):
        return name, pretrained, {}
    tag_config = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_config:
        raise InvalidInputError(
            f"--clip-pretrained {pretrained!r} is neither a file nor a tag of {name}; "
            f"known tags: {_tags_text(open_clip, name)}"
        )
    checkpoint = _cached_checkpoint(name, pretrained, tag_config)
    # The tag's own preprocessing and activation: ViT-L-14 'openai' weights, for
    # one, were trained with QuickGELU, which the plain config does not use.
    extra = {
        "force_quick_gelu": bool(tag_config.get("quick_gelu", False)),
        "image_mean": tag_config.get("mean"),
        "image_std": tag_config.get("std"),
        "image_interpolation": tag_config.get("interpolation"),
    }
    return name, checkpoint, {key: value for key, value in extra.items() if value}


def _local_dir(model: str) -> Path | None:
    if model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not (folder / LOCAL_CONFIG_NAME).is_file():
            raise ModelLoadError(
                f"--clip-model {model}: {folder / LOCAL_CONFIG_NAME} not found; a "
                "local-dir folder needs open_clip_config.json and a weights file"
            )
        return folder
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / LOCAL_CONFIG_NAME).is_file():
        return folder
    return None


def _register_config_file(open_clip, path: Path) -> str:
    """Add a model config JSON to open_clip's registry; return its name (the stem)."""
    if not path.is_file():
        raise InvalidInputError(f"--clip-model: config file {path} not found")
    open_clip.add_model_config(path)
    if path.stem not in open_clip.list_models():
        raise InvalidInputError(
            f"--clip-model: {path} is not an open_clip model config (it needs "
            "embed_dim, vision_cfg and text_cfg)"
        )
    return path.stem


def _unknown_model_message(open_clip, model: str) -> str:
    known = open_clip.list_models()
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.6)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"--clip-model {model!r} is not an open_clip model; {suggestion}known models "
        f"include {', '.join(COMMON_MODELS)} ({len(known)} in all: "
        "python -c 'import open_clip; print(open_clip.list_models())'); a "
        "local-dir:FOLDER or a config .json path also works"
    )


def _tags_text(open_clip, name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        return "none"
    text = ", ".join(tags[:8])
    return text + " ..." if len(tags) > 8 else text


def _cached_checkpoint(name: str, tag: str, tag_config: dict) -> str:
    """Return the local path of a tag's weights from the Hugging Face cache.

    renderqa never downloads: an absent file raises ModelLoadError with the
    command that fetches it.
    """
    from huggingface_hub import try_to_load_from_cache

    hub_path = tag_config.get("hf_hub", "")
    if not hub_path:
        raise ModelLoadError(
            f"CLIP weights {name}/{tag} are published only as a URL "
            f"({tag_config.get('url', 'unknown')}); download that file and pass its "
            "path as --clip-pretrained"
        )
    # "org/repo/" names the default weights file, "org/repo/file.pt" a given one.
    repo_id, filename = os.path.split(hub_path)
    candidates = _weight_filenames(filename)
    for candidate in candidates:
        cached = try_to_load_from_cache(repo_id=repo_id, filename=candidate)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    raise ModelLoadError(
        f"CLIP weights {name}/{tag} are not in the Hugging Face cache and renderqa "
        f"does not download; fetch them with `hf download {repo_id} {candidates[0]}` "
        "on a machine with network access (then copy the cache), or pass a local "
        "checkpoint file as --clip-pretrained"
    )


def _weight_filenames(filename: str) -> list[str]:
    """List the files open_clip would accept for a hub entry, safetensors first."""
    if not filename:
        return ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]
