"""Concept preprocessing against the authors' torch/torchvision-style pipeline, and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import concept_files
from elite_export.errors import EliteError
from elite_export.runtime.preprocess import load_concept, load_image, load_mask, nearest_resize


def authors_mask16(mask_rgb: np.ndarray) -> np.ndarray:
    """CustomDatasetWithBG + validation: uint8*255 -> ToTensor -> nearest 128 -> nearest 16 -> channel 0."""
    m = torch.from_numpy((mask_rgb > 0).astype(np.uint8) * 255).permute(2, 0, 1).float()[None] / 255
    m = F.interpolate(m, size=(128, 128), mode="nearest")
    return F.interpolate(m, (16, 16), mode="nearest")[0, 0].reshape(-1).numpy()


@pytest.mark.parametrize("n", [1, 4, 7, 11, 15, 20])
def test_mask_and_pixels_match_the_authors(n):
    img_path, mask_path = concept_files(n)
    c = load_concept(img_path, mask_path)
    mask_rgb = np.asarray(Image.open(mask_path).convert("RGB"))
    np.testing.assert_array_equal(c.mask, authors_mask16(mask_rgb))
    image = np.asarray(Image.open(img_path).convert("RGB"))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for arr, got in ((image, c.pixels), (image * (mask_rgb > 0), c.object_pixels)):
        small = Image.fromarray(arr.astype("uint8")).resize((224, 224), resample=Image.BICUBIC)
        want = (torch.from_numpy(np.array(small)).permute(2, 0, 1).float().div(255) - mean) / std
        np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("size_in,size_out", [(236, 128), (399, 128), (128, 16), (100, 16), (17, 128), (64, 128)])
def test_nearest_resize_is_torchs(size_in, size_out):
    a = np.random.default_rng(0).integers(0, 2, (size_in, size_in + 3)).astype(bool)
    want = F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=(size_out, size_out),
                         mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(nearest_resize(a, size_out).astype(np.float32), want)


def save(tmp_path, name, arr, mode=None):
    path = str(tmp_path / name)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def test_image_modes_are_converted_sensibly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((32, 40, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(save(tmp_path, "a.png", rgba)), rgb)  # alpha dropped (as the authors)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(load_image(save(tmp_path, "l.png", grey)), np.repeat(grey[..., None], 3, 2))
    deep = (grey.astype(np.uint16) * 257)  # 16-bit greyscale: scaled to 8 bits, not clipped at 255
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(str(tmp_path / "d.png"))[..., 0], grey)
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))


def test_bad_images_and_masks_are_user_errors(tmp_path):
    img = save(tmp_path, "i.png", np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(EliteError, match="does not exist"):
        load_concept(str(tmp_path / "nope.jpg"), img)
    with pytest.raises(EliteError, match="not an image"):
        (tmp_path / "x.png").write_text("hello")
        load_image(str(tmp_path / "x.png"))
    with pytest.raises(EliteError, match="floating-point"):
        Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "f.tif")
        load_image(str(tmp_path / "f.tif"))
    with pytest.raises(EliteError, match="is 20x32 but the image is 40x32"):
        load_mask(save(tmp_path, "m.png", np.full((32, 20), 255, np.uint8)), (32, 40))
    with pytest.raises(EliteError, match="empty"):
        load_mask(save(tmp_path, "e.png", np.zeros((32, 40), np.uint8)), (32, 40))
    m = np.zeros((32, 40), np.uint8)
    m[3, 4] = 1  # any value > 0 is object
    assert load_mask(save(tmp_path, "one.png", m), (32, 40)).sum() == 1
