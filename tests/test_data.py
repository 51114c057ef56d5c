"""data.py: layouts, aliases, refusals, decoding of every PIL mode, splits, views, synthetic data.

What each test pins down:
- class-folder aliases (`no_tumor/`, `glioma_tumor/`, `No Tumor/`) map to the four classes;
- class folders get a seeded, stratified 80/20 split; Kaggle folders keep the official split;
- refused with a message naming the folder: unknown folders, a class with no image in train or
  test (empty or missing folder), an empty validation split (the fix offered is one the training
  scripts accept), a bad split CSV or lesion CSV;
- every PIL mode decodes to RGB (16-bit MRI stretched, not clipped); a broken file raises
  DecodeError naming it; views are deterministic per (content, view);
- the synthetic writer is atomic (a killed writer leaves nothing; the rerun succeeds), two
  writers at once never delete each other's folder and the second keeps the first's dataset,
  and its lesions.csv boxes hold the bright lesion;
- folder links back into a dataset are refused (a loop), outside ones followed; split --out is
  never replaced without --overwrite; merge --out inside a source is refused; a BOM is read.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data.py
"""
import csv
import os
import shutil

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter
from PIL import Image

import data


def write_image(path, mode="L", size=(20, 16)):
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
    with pytest.raises(SystemExit, match=r"error: .*tumour_misc/.*need class folders glioma/ me"):
        data.load_splits(str(tmp_path), seed=0)
    with pytest.raises(SystemExit, match="no such folder"):
        data.load_splits(str(tmp_path / "missing"), seed=0)


def kaggle_folder(root, counts):
    """Kaggle layout with counts[(split, class)] images (default 3 each)."""
    for split in ("Training", "Testing"):
        for name in data.CLASSES:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(counts.get((split, name), 3)):
                write_image(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def test_a_class_without_images_in_train_or_test_is_refused(tmp_path):
    root = kaggle_folder(tmp_path / "empty", {("Testing", "meningioma"): 0})
    with pytest.raises(SystemExit, match=r"Testing/meningioma: no meningioma image in the test "):
        data.load_splits(root, seed=0, val_fraction=0)
    os.rmdir(os.path.join(root, "Testing", "meningioma"))   # a missing folder: the same
    with pytest.raises(SystemExit, match=r"Testing/meningioma: no meningioma image in the test "):
        data.load_splits(root, seed=0, val_fraction=0)
    root = kaggle_folder(tmp_path / "no_train", {("Training", "pituitary"): 0})
    with pytest.raises(SystemExit, match=r"Training/pituitary: no pituitary image in the train "):
        data.load_splits(root, seed=0, val_fraction=0)
    for name in data.CLASSES:                                # class folders: an empty one
        for i in range(0 if name == "notumor" else 10):
            write_image(str(tmp_path / "folders" / name / f"{i}.png"))
    os.makedirs(tmp_path / "folders" / "notumor", exist_ok=True)
    with pytest.raises(SystemExit, match=r"folders/notumor: no notumor image in the train split"):
        data.load_splits(str(tmp_path / "folders"), seed=0)


def test_an_empty_validation_split_is_refused(tmp_path):
    root = kaggle_folder(tmp_path / "small", {})             # 3 training images per class
    # the fixes offered are ones the training scripts accept (they refuse --val-fraction 0)
    with pytest.raises(SystemExit, match=r"empty validation split \(--val-fraction 0.1, 12 "
                       r"training images\); raise --val-fraction, or pass --select-on test"):
        data.load_splits(root, seed=0, val_fraction=0.1)
    assert data.load_splits(root, seed=0, val_fraction=0).val == []
    assert len(data.load_splits(root, seed=0, val_fraction=0.2).val) == 4
    split_csv = tmp_path / "no_val.csv"                      # a split CSV without val rows
    rows = [f"Training/{name}/{i}.png,{name},train" for name in data.CLASSES for i in range(3)]
    rows += [f"Testing/{name}/0.png,{name},test" for name in data.CLASSES]
    split_csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match=r"no_val.csv: empty validation split .*; add val rows "
                       r"to the CSV, or pass --select-on test"):
        data.load_splits(root, seed=0, val_fraction=0.1, split_csv=str(split_csv))


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
    with pytest.raises(data.DecodeError, match="broken.jpg: cannot decode image.*--skip-bad"):
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
    official = data.load_splits(synth_dir, 0)
    csv_path = tmp_path / "split.csv"
    rows = [(s.path, data.CLASSES[s.label], part) for part in ("train", "val", "test")
            for s in getattr(official, part)]
    rows[0] = (rows[0][0], "glioma_tumor", "train")              # an alias is accepted
    csv_path.write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    splits = data.load_splits(synth_dir, 0, split_csv=str(csv_path))
    assert (splits.train, splits.val, splits.test) == (official.train, official.val, official.test)
    csv_path.write_text("path,label,split\nTraining/glioma/nope.jpg,glioma,train\n")
    with pytest.raises(SystemExit, match="nope.jpg not found"):
        data.load_splits(synth_dir, 0, split_csv=str(csv_path))
    csv_path.write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows)
                        + ",".join(rows[0][:2]) + ",test\n")  # one image in train and test
    with pytest.raises(SystemExit, match="is listed twice; each image belongs to one part"):
        data.load_splits(synth_dir, 0, split_csv=str(csv_path))
    only_glioma = [r for r in rows if r[1] == "glioma"]
    csv_path.write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in only_glioma))
    with pytest.raises(SystemExit, match="split.csv: no meningioma image in the train split"):
        data.load_splits(synth_dir, 0, split_csv=str(csv_path))


def test_synth_command_writes_kaggle_layout_and_lesion_boxes(tmp_path):
    data.main(["synth", "--out", str(tmp_path / "s"), "--per-class", "8"])
    for split, count in (("Training", 8), ("Testing", 5)):
        for name in data.CLASSES:
            assert len(os.listdir(tmp_path / "s" / split / name)) == count
    with open(tmp_path / "s" / "lesions.csv") as f:  # path,x0,y0,x1,y1 (x1, y1 exclusive)
        boxes = {row[0]: tuple(map(int, row[1:])) for row in list(csv.reader(f))[1:]}
    assert len(boxes) == 3 * (8 + 5) and "Testing/glioma/glioma_0003.jpg" in boxes
    assert not any("notumor" in path for path in boxes)
    scalp_brightest = []
    for path, (x0, y0, x1, y1) in boxes.items():  # the box holds the bright lesion
        pixels = np.asarray(Image.open(tmp_path / "s" / path), dtype=np.float64)
        inside = np.zeros(pixels.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert pixels[inside].mean() > pixels[~inside].mean() + 30, path
        smooth = uniform_filter(pixels, 3)  # 3 x 3 means: the noise (sd 20) averaged out
        assert smooth[inside].max() > np.median(pixels[pixels > 25]) + 50, path  # above brain
        scalp_brightest.append(not inside[np.unravel_index(smooth.argmax(), smooth.shape)])
        assert 0 < (x1 - x0) * (y1 - y0) < 0.2 * pixels.size
    assert np.mean(scalp_brightest) >= 0.9  # the scalp, not the lesion, is the brightest tissue
    with pytest.raises(SystemExit, match="not empty"):
        data.main(["synth", "--out", str(tmp_path / "s")])


def test_synthetic_writer_killed_midway_leaves_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "demo")
    real_synth_image, calls = data.synth_image, []

    def killed_after_ten(*args):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt("killed")
        return real_synth_image(*args)

    monkeypatch.setattr(data, "synth_image", killed_after_ten)
    with pytest.raises(KeyboardInterrupt):
        data.write_synthetic_dataset(out, per_class=8)
    partial = f"{out}.partial{os.getpid()}"                   # this writer's own folder
    assert not os.path.exists(out) and os.path.isdir(partial)  # stale, half written
    monkeypatch.setattr(data, "synth_image", real_synth_image)
    data.write_synthetic_dataset(out, per_class=8)
    assert not os.path.exists(partial)
    assert sum(len(files) for _, _, files in os.walk(out)) == 4 * (8 + 5) + 2  # + the 2 CSVs


def test_two_synthetic_writers_at_once_keep_one_complete_dataset(tmp_path, monkeypatch):
    """Two demos started together: neither deletes the other's half-written folder, and the one
    that finishes second keeps the first one's dataset (and removes its own folder)."""
    out = str(tmp_path / "demo")
    other = tmp_path / "demo.partial999999"                   # another writer, still writing
    other.mkdir()
    (other / "half.jpg").write_bytes(b"half")
    first = data.write_synthetic_dataset(str(tmp_path / "first"), per_class=4)
    real_synth_image = data.synth_image

    def other_writer_finishes(*args):
        if not os.path.exists(out):  # its rename lands while this writer is midway
            shutil.copytree(first, out)
        return real_synth_image(*args)

    monkeypatch.setattr(data, "synth_image", other_writer_finishes)
    assert data.write_synthetic_dataset(out, per_class=8) == out
    assert len(os.listdir(os.path.join(out, "Training", "glioma"))) == 4   # the first's data
    assert sorted(os.listdir(tmp_path)) == ["demo", "demo.partial999999", "first"]
    assert os.listdir(other) == ["half.jpg"]                 # left alone
    shutil.rmtree(out)

    def user_file_appears(*args):  # out filled meanwhile by something that is not a dataset
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "notes.txt"), "w").close()
        return real_synth_image(*args)

    monkeypatch.setattr(data, "synth_image", user_file_appears)
    with pytest.raises(SystemExit, match="demo: folder is not empty; choose a new --out"):
        data.write_synthetic_dataset(out, per_class=4)
    assert os.listdir(out) == ["notes.txt"]
    assert not os.path.exists(f"{out}.partial{os.getpid()}")




def test_folder_links_into_the_dataset_are_refused_outside_ones_followed(tmp_path):
    """Issue 22: Training/notumor/loop -> .. made glob read the tree ~40 times, every image a
    notumor; such a link is refused, named. A link to a folder outside the dataset is read once."""
    root = data.write_synthetic_dataset(str(tmp_path / "d"), per_class=5, seed=0)
    outside = tmp_path / "more"
    write_image(str(outside / "extra.png"))
    os.symlink(outside, os.path.join(root, "Training", "glioma", "more"))
    images = data.find_images(root)[0]
    assert ("Training/glioma/more/extra.png", "glioma", "Training") in images
    assert len(images) == 4 * (5 + 5) + 1
    os.symlink("..", os.path.join(root, "Training", "notumor", "loop"))
    with pytest.raises(SystemExit, match="notumor/loop: a link to .*Training, inside the dataset"):
        data.main(["split", "--data", root, "--out", str(tmp_path / "s.csv")])


def test_split_and_merge_never_overwrite_nor_write_into_a_source(synth_dir, tmp_path, capsys):
    """Issue 22: split --out replaces an existing CSV only with --overwrite (a folder: named);
    merge --out inside a source's folder is refused (it would pollute the source)."""
    out = tmp_path / "split.csv"
    out.write_text("mine")
    with pytest.raises(SystemExit, match="split.csv: exists; pass --overwrite"):
        data.main(["split", "--data", synth_dir, "--out", str(out)])
    assert out.read_text() == "mine"
    with pytest.raises(SystemExit, match="--out .*: is a folder; pass a file name"):
        data.main(["split", "--data", synth_dir, "--out", str(tmp_path)])
    data.main(["split", "--data", synth_dir, "--out", str(out), "--overwrite"])
    assert out.read_text().startswith("path,label,split")
    for inside in (os.path.join(synth_dir, "Training", "glioma", "m"), synth_dir):
        with pytest.raises(SystemExit, match="inside the source .*; choose a folder outside"):
            data.main(["merge", str(tmp_path), synth_dir, "--out", inside])
    assert not os.path.exists(os.path.join(synth_dir, "Training", "glioma", "m"))


def test_a_split_csv_saved_with_a_bom_is_read(synth_dir, tmp_path):
    """Issue 22: Excel's UTF-8 BOM was read as a column named '\\ufeffpath'."""
    plain = data.load_splits(synth_dir, 0, 0.1)
    rows = [f"{s.path},{data.CLASSES[s.label]},{part}" for part in ("train", "val", "test")
            for s in getattr(plain, part)]
    split = tmp_path / "bom.csv"
    split.write_text("\ufeffpath,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert data.load_splits(synth_dir, 0, 0.1, str(split)).test == plain.test
