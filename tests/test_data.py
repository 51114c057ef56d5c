"""data.py: layouts, aliases, errors, decoding of every PIL mode, splits, views, synthetic set."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write_image(path, mode="L", size=(20, 16), value=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def test_aliases_are_normalised():
    assert data.normalise_class_name("No Tumor") == "notumor"
    assert data.normalise_class_name("no_tumor") == "notumor"
    assert data.normalise_class_name("no") == "notumor"
    assert data.normalise_class_name("glioma_tumor") == "glioma"
    assert data.normalise_class_name("Pituitary-Tumor") == "pituitary"
    assert data.normalise_class_name("yes") is None


def test_class_folders_split_80_20_stratified_and_seeded(tmp_path):
    for folder, n in (("glioma_tumor", 20), ("meningioma", 10), ("no", 30), ("pituitary", 40)):
        for i in range(n):
            write_image(str(tmp_path / folder / f"{i}.png"))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_image(str(tmp_path / "no" / ".ipynb_checkpoints" / "x-checkpoint.png"))
    (tmp_path / "pituitary" / "notes.txt").write_text("not an image")
    splits = data.load_splits(str(tmp_path), seed=42, val_fraction=0.1)
    assert splits.source.startswith("seeded 80/20")
    test_counts = np.bincount([s.label for s in splits.test], minlength=4)
    assert test_counts.tolist() == [4, 2, 6, 8]           # 20% of each class
    assert len(splits.train) + len(splits.val) == 80
    assert splits.non_images == ["pituitary/notes.txt"]   # reported, not mixed in
    assert not any("checkpoint" in s.path for s in splits.train + splits.val + splits.test)
    again = data.load_splits(str(tmp_path), seed=42, val_fraction=0.1)
    other = data.load_splits(str(tmp_path), seed=7, val_fraction=0.1)
    assert again.test == splits.test and other.test != splits.test
    assert not set(splits.test) & set(splits.train + splits.val)


def test_kaggle_layout_keeps_official_split(synth_dir):
    splits = data.load_splits(synth_dir, seed=0, val_fraction=0.1)
    assert splits.source == "official"
    assert all(s.path.startswith("Testing/") for s in splits.test)
    assert all(s.path.startswith("Training/") for s in splits.train + splits.val)
    assert np.bincount([s.label for s in splits.val]).tolist() == [4, 4, 4, 4]


def test_unknown_folder_is_an_error_listing_found_and_expected(tmp_path):
    write_image(str(tmp_path / "glioma" / "a.png"))
    write_image(str(tmp_path / "tumour_misc" / "b.png"))
    with pytest.raises(data.DataError, match=r"tumour_misc/.*expected class folders glioma/"):
        data.load_splits(str(tmp_path), seed=0)
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_splits(str(tmp_path / "missing"), seed=0)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_every_pil_mode_becomes_rgb(tmp_path, mode):
    path = str(tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}")
    if mode == "I;16":  # 12-bit MRI values in a 16-bit image: must be stretched, not clipped
        pixels = (np.arange(20 * 16).reshape(16, 20) * 12).astype(np.uint16)
        Image.fromarray(pixels).save(path)  # uint16 -> mode I;16
    else:
        write_image(path, mode)
    image = data.load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 16)
    if mode == "I;16":
        gray = np.asarray(image)[..., 0]
        assert gray.min() == 0 and gray.max() == 255


def test_undecodable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(data.DataError, match="broken.jpg: cannot decode image.*--skip-bad"):
        data.load_rgb(str(path))


def test_views_are_deterministic_and_view_zero_is_plain(tmp_path):
    write_image(str(tmp_path / "a.png"), "RGB", size=(48, 40))
    image = data.load_rgb(str(tmp_path / "a.png"))
    plain = data.image_view(image, "abc", 0, 32)
    expected = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.allclose(plain, torch.from_numpy(expected).permute(2, 0, 1))
    first, again = data.image_view(image, "abc", 1, 32), data.image_view(image, "abc", 1, 32)
    assert torch.equal(first, again)                            # cacheable: same every time
    assert not torch.equal(first, data.image_view(image, "abc", 2, 32))
    assert first.shape == (3, 32, 32) and 0 <= first.min() and first.max() <= 1


def test_split_csv_is_read_and_checked(synth_dir, tmp_path):
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("path,label,split\nTraining/glioma/glioma_0000.jpg,glioma,train\n"
                        "Testing/pituitary/pituitary_0001.jpg,pituitary,test\n"
                        "Training/notumor/notumor_0003.jpg,no_tumor,val\n")
    splits = data.load_splits(synth_dir, 0, split_csv=str(csv_path))
    assert [s.label for s in splits.train + splits.val + splits.test] == [0, 2, 3]
    csv_path.write_text("path,label,split\nTraining/glioma/nope.jpg,glioma,train\n")
    with pytest.raises(data.DataError, match="nope.jpg not found"):
        data.load_splits(synth_dir, 0, split_csv=str(csv_path))


def test_synth_command_writes_kaggle_layout(tmp_path):
    data.main(["synth", "--out", str(tmp_path / "s"), "--per-class", "8"])
    for split, count in (("Training", 8), ("Testing", 5)):
        for name in data.CLASSES:
            assert len(os.listdir(tmp_path / "s" / split / name)) == count
    with pytest.raises(SystemExit, match="not empty"):
        data.main(["synth", "--out", str(tmp_path / "s")])
