"""CLIP scoring: equality with open_clip called directly, resize modes, errors.

The tiny CLIP fixture has random weights, so its cosines mean nothing; the tests
compare renderqa's numbers with open_clip's own on the same image and text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from skimage import data

from fixtures import make_tiny_clip
from renderqa.core.clip_score import load_clip_scorer
from renderqa.core.errors import InvalidInputError, ModelLoadError

BUILD_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "build"
LONG_CAPTION = "a red ceramic mug on a white table, " * 20


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> Path:
    return make_tiny_clip.built_or_build(BUILD_DIR, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_files):
    return load_clip_scorer(
        str(clip_files / "tiny-clip.json"),
        str(clip_files / "tiny-clip.safetensors"),
        resize_mode="pad",
    )


def wide_photo() -> Image.Image:
    """The scikit-image astronaut, cropped to a 3:2 landscape like an SDXL render."""
    return Image.fromarray(data.astronaut()[64:448, :])


def direct_cosine(clip_files: Path, image: Image.Image, text: str, mode: str):
    """The cosine computed with open_clip's public API only."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip",
        pretrained=str(clip_files / "tiny-clip.safetensors"),
        image_resize_mode=mode,
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image)[None])
        text_features = model.encode_text(tokenizer([text]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return float((image_features * text_features).sum())


@pytest.mark.parametrize(
    ("resize", "open_clip_mode"), [("pad", "longest"), ("crop", "shortest")]
)
def test_cosine_matches_open_clip_directly(clip_files, resize, open_clip_mode):
    scorer = load_clip_scorer(
        str(clip_files / "tiny-clip.json"),
        str(clip_files / "tiny-clip.safetensors"),
        resize_mode=resize,
    )
    image = wide_photo()
    text = "an astronaut in a white suit"
    ours = scorer.score([image], [text])[0]
    theirs = direct_cosine(clip_files, image, text, open_clip_mode)
    assert abs(ours - theirs) < 1e-5, f"cosine differs by {abs(ours - theirs):.2e}"
    assert -1.0 <= ours <= 1.0


def test_batched_scores_equal_single_scores(scorer):
    images = [
        wide_photo(),
        Image.fromarray(data.chelsea()),
        Image.fromarray(data.coffee()),
    ]
    texts = ["an astronaut", "a cat", "a cup of coffee"]
    scorer.batch_size = 2
    batched = scorer.score(images, texts)
    singles = [
        scorer.score([image], [text])[0]
        for image, text in zip(images, texts, strict=True)
    ]
    assert np.allclose(batched, singles, atol=1e-5), np.abs(
        np.subtract(batched, singles)
    )


def test_local_dir_layout_gives_same_cosine(clip_files, scorer):
    local = load_clip_scorer(f"local-dir:{clip_files / 'local-dir'}", None, "pad")
    image = wide_photo()
    difference = abs(
        local.score([image], ["a photo"])[0] - scorer.score([image], ["a photo"])[0]
    )
    assert difference < 1e-6, f"local-dir cosine differs by {difference:.2e}"


def test_crop_ignores_sides_pad_does_not(clip_files):
    base = np.full((64, 192, 3), 128, dtype=np.uint8)
    base[:, 80:112] = (220, 40, 40)
    changed = base.copy()
    changed[:, :40] = (0, 0, 255)  # only outside the central 64x64 square
    images = [Image.fromarray(base), Image.fromarray(changed)]
    crop = load_clip_scorer(
        str(clip_files / "tiny-clip.json"),
        str(clip_files / "tiny-clip.safetensors"),
        resize_mode="crop",
    )
    pad = load_clip_scorer(
        str(clip_files / "tiny-clip.json"),
        str(clip_files / "tiny-clip.safetensors"),
        resize_mode="pad",
    )
    crop_scores = crop.score(images, ["a red stripe"] * 2)
    pad_scores = pad.score(images, ["a red stripe"] * 2)
    assert abs(crop_scores[0] - crop_scores[1]) < 1e-6
    assert abs(pad_scores[0] - pad_scores[1]) > 1e-4


def test_captions_over_context_are_flagged(scorer):
    assert scorer.context_length == 77
    assert scorer.caption_truncated(LONG_CAPTION) is True
    assert scorer.caption_truncated("a red mug") is False


def test_each_caption_is_encoded_once(scorer, monkeypatch):
    calls = []
    original = scorer.model.encode_text

    def counting(tokens, *args, **kwargs):
        calls.append(tokens.shape[0])
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(scorer.model, "encode_text", counting)
    image = wide_photo()
    scorer.score([image, image], ["a new caption", "a new caption"])
    scorer.score([image], ["a new caption"])
    assert calls == [1]


def test_unknown_model_lists_known_ones():
    with pytest.raises(InvalidInputError) as error:
        load_clip_scorer("ViT-B-99", "laion2b_s34b_b79k")
    message = str(error.value)
    assert "'ViT-B-99' is not an open_clip model" in message
    assert "ViT-B-32" in message
    assert "ViT-L-14" in message


def test_unknown_tag_lists_known_tags():
    with pytest.raises(InvalidInputError) as error:
        load_clip_scorer("ViT-B-32", "no-such-tag")
    assert "laion2b_s34b_b79k" in str(error.value)


def test_absent_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as error:
        load_clip_scorer("ViT-B-32", "laion2b_s34b_b79k")
    message = str(error.value)
    assert "not in the Hugging Face cache" in message
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "--clip-pretrained" in message


def test_local_dir_without_config_is_reported(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_clip_scorer(f"local-dir:{tmp_path}", None)
    assert "open_clip_config.json not found" in str(error.value)


def test_mismatched_checkpoint_is_a_load_error(clip_files, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(broken))
    with pytest.raises(ModelLoadError) as error:
        load_clip_scorer(str(clip_files / "tiny-clip.json"), str(broken))
    assert "cannot load CLIP model" in str(error.value)
