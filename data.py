"""Data for tumor-vlm: find the images, split them, decode them, make augmented views.

    python data.py synth --out ./synth --per-class 60     # a small learnable MRI-like dataset

`--data DIR` (for every training script) is either the Kaggle layout, `DIR/Training/<class>/` and
`DIR/Testing/<class>/` (the official split), or class folders directly, `DIR/<class>/` (then a
stratified 80/20 train/test split by `--seed`, as the paper's text says). A validation split is
carved from training (default 10%, stratified, seeded) and chooses the best epoch. `--split CSV`
(columns path,label,split) fixes all three parts instead, e.g. the leak-free split below.

Views: view 0 is the plain image; views 1..K-1 are augmentations whose parameters are a pure
function of (image content hash, view index), so the feature cache can store them and every seed
reuses the same cached views. Each epoch draws one view per training image.
"""
import argparse
import csv
import hashlib
import io
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CLASS_ALIASES = {  # lower-case folder name with spaces/hyphens as "_" -> class
    "glioma": "glioma", "glioma_tumor": "glioma", "gliomas": "glioma",
    "meningioma": "meningioma", "meningioma_tumor": "meningioma", "meningiomas": "meningioma",
    "notumor": "notumor", "no_tumor": "notumor", "no": "notumor", "normal": "notumor",
    "healthy": "notumor", "no_tumour": "notumor", "notumour": "notumor",
    "pituitary": "pituitary", "pituitary_tumor": "pituitary", "pituitary_tumour": "pituitary",
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
SPLIT_FOLDERS = {"training": "train", "train": "train", "testing": "test", "test": "test"}

# Augmentation of views 1..K-1 (the paper's Data Preprocessing list). Changing any number here
# changes AUGMENTATION_ID, which is part of the feature-cache key, so no stale view is ever read.
ROTATION_DEGREES = 15.0      # rotation drawn uniformly in [-15, 15] degrees
ZOOM_RANGE = (0.9, 1.1)      # scale factor of the affine zoom
BRIGHTNESS_RANGE = (0.8, 1.2)
CONTRAST_RANGE = (0.8, 1.2)
NOISE_VARIANCE = 0.02        # Gaussian noise, mean 0, variance 0.02 on [0, 1] pixels (paper)
AUGMENTATION_ID = f"flip-hv|rot{ROTATION_DEGREES}|zoom{ZOOM_RANGE}|bright{BRIGHTNESS_RANGE}|" \
                  f"contrast{CONTRAST_RANGE}|noise{NOISE_VARIANCE}|resize-bicubic-squash"


class DataError(ValueError):
    """A problem with the user's data: the message names the file or folder and the fix."""


@dataclass(frozen=True)
class Sample:
    path: str   # relative to the data folder, e.g. "Testing/glioma/Te-gl_0010.jpg"
    label: int  # index into CLASSES


@dataclass
class Splits:
    train: list
    val: list
    test: list
    source: str                # "official" (Training/Testing), "seeded 80/20", or the split CSV
    non_images: list           # files found in class folders that are not images (reported)


def is_hidden(name):
    return name.startswith(".") or name == "__MACOSX"


def normalise_class_name(name):
    """'No Tumor', 'no_tumor', 'glioma_tumor', ... -> a name in CLASSES, or None if unknown."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return CLASS_ALIASES.get(key)


def visible_subfolders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))


# ---- finding images ----------------------------------------------------------------------------

def scan_class_folders(data_dir, rel_root=""):
    """Images under data_dir/rel_root/<class>/ (recursively), hidden files and folders ignored.

    Returns (samples sorted by path, non-image files). Unknown folders are an error.
    """
    root = os.path.join(data_dir, rel_root)
    folders = visible_subfolders(root)
    unknown = [f for f in folders if normalise_class_name(f) is None]
    if unknown or not folders:
        found = ", ".join(f + "/" for f in folders) or "nothing"
        raise DataError(
            f"{root}: found {found}; expected class folders glioma/ meningioma/ notumor/ "
            f"pituitary/ (aliases such as no_tumor/, no/, glioma_tumor/ are accepted), "
            f"or Training/ and Testing/ folders that contain them")
    samples, non_images = [], []
    for folder in folders:
        label = CLASSES.index(normalise_class_name(folder))
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if is_hidden(name):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), data_dir).replace(os.sep, "/")
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    samples.append(Sample(rel, label))
                else:
                    non_images.append(rel)
    return sorted(samples, key=lambda s: s.path), non_images


def stratified_split(samples, fraction, seed):
    """Split samples into (rest, part) with round(fraction * n_c) of each class c in part."""
    rng = np.random.default_rng(seed)
    rest, part = [], []
    for label in range(len(CLASSES)):
        members = [s for s in samples if s.label == label]
        order = rng.permutation(len(members))
        n_part = int(round(fraction * len(members)))
        part += [members[i] for i in order[:n_part]]
        rest += [members[i] for i in order[n_part:]]
    return sorted(rest, key=lambda s: s.path), sorted(part, key=lambda s: s.path)


def read_split_csv(path, data_dir):
    """A split CSV (columns path,label,split; split in train/val/test) -> Splits."""
    parts = {"train": [], "val": [], "test": []}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected path,label,split")
        for line, row in enumerate(reader, start=2):
            label = normalise_class_name(row["label"])
            if label is None or row["split"] not in parts:
                raise DataError(f"{path}:{line}: label {row['label']!r} / split {row['split']!r}; "
                                f"expected a class in {CLASSES} and a split in train/val/test")
            if not os.path.isfile(os.path.join(data_dir, row["path"])):
                raise DataError(f"{path}:{line}: {row['path']} not found under {data_dir}; "
                                f"paths in a split CSV are relative to --data")
            parts[row["split"]].append(Sample(row["path"], CLASSES.index(label)))
    return Splits(parts["train"], parts["val"], parts["test"], f"split CSV {path}", [])


def load_splits(data_dir, seed, val_fraction=0.1, split_csv=None):
    """Train/val/test samples for --data DIR (see the module docstring for the layouts)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such folder; pass --data with the dataset folder")
    if split_csv:
        return read_split_csv(split_csv, data_dir)
    split_folders = {SPLIT_FOLDERS[f.lower()]: f for f in visible_subfolders(data_dir)
                     if f.lower() in SPLIT_FOLDERS}
    if set(split_folders) == {"train", "test"}:
        train, non_train = scan_class_folders(data_dir, split_folders["train"])
        test, non_test = scan_class_folders(data_dir, split_folders["test"])
        source, non_images = "official", non_train + non_test
    else:
        samples, non_images = scan_class_folders(data_dir)
        train, test = stratified_split(samples, 0.2, seed)
        source = f"seeded 80/20 (seed {seed})"
    train, val = stratified_split(train, val_fraction, seed)
    return Splits(train, val, test, source, non_images)


# ---- decoding and views ------------------------------------------------------------------------

def file_hash(path):
    """SHA-1 of the file's bytes: the image part of every feature-cache key."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def load_rgb(path):
    """Decode any PIL mode (L, RGB, RGBA, P, I;16, I, F, CMYK, ...) to an 8-bit RGB image."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as error:  # PIL raises several types for truncated or non-image files
        raise DataError(f"{path}: cannot decode image ({error}); remove it or pass --skip-bad")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit MRI exports: stretch the used range to 0..255 (plain convert("L") clips it)
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(pixels.round().astype(np.uint8))  # mode L
    return image.convert("RGB")


def view_generator(content_hash, view):
    """The torch.Generator that fixes view `view` of one image, independent of --seed."""
    digest = hashlib.sha1(f"{content_hash}:{view}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def image_view(image, content_hash, view, image_size):
    """(3, S, S) float tensor in [0, 1]: the image resized to S x S (view 0) or augmented."""
    import torchvision.transforms.v2.functional as TF
    image = image.resize((image_size, image_size), Image.BICUBIC)  # "resize to 224 x 224"
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    if view == 0:
        return pixels.contiguous()
    g = view_generator(content_hash, view)
    uniform = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()
    if torch.rand((), generator=g) < 0.5:
        pixels = pixels.flip(-1)  # horizontal flip
    if torch.rand((), generator=g) < 0.5:
        pixels = pixels.flip(-2)  # vertical flip
    angle = uniform(-ROTATION_DEGREES, ROTATION_DEGREES)
    zoom = uniform(*ZOOM_RANGE)
    pixels = TF.affine(pixels, angle=angle, translate=[0, 0], scale=zoom, shear=[0.0, 0.0],
                       interpolation=TF.InterpolationMode.BILINEAR)
    pixels = TF.adjust_brightness(pixels, uniform(*BRIGHTNESS_RANGE))
    pixels = TF.adjust_contrast(pixels, uniform(*CONTRAST_RANGE))
    noise = torch.randn(pixels.shape, generator=g) * math.sqrt(NOISE_VARIANCE)
    return (pixels + noise).clamp(0, 1)


# ---- synthetic MRI-like data -------------------------------------------------------------------

def synth_image(label, rng, size=96):
    """A grey 'brain' ellipse on black; the tumour class fixes a lesion's place, shape and look.

    glioma: large ring-enhancing lesion (bright rim, dark core) inside a hemisphere;
    meningioma: bright, round, well-defined mass at the brain's edge;
    pituitary: small bright blob below the centre; notumor: no lesion.
    """
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = size * rng.uniform(0.46, 0.54), size * rng.uniform(0.46, 0.54)
    rx, ry = size * rng.uniform(0.33, 0.40), size * rng.uniform(0.38, 0.44)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.uniform(90, 130)))
    draw.ellipse([cx - rx * 0.35, cy - ry * 0.2, cx + rx * 0.35, cy + ry * 0.2],
                 fill=int(rng.uniform(50, 70)))  # ventricles
    name = CLASSES[label]
    if name == "glioma":
        r = size * rng.uniform(0.12, 0.16)
        x = cx + rng.choice([-1, 1]) * rx * rng.uniform(0.35, 0.5)
        y = cy + ry * rng.uniform(-0.4, 0.1)
        draw.ellipse([x - r, y - r * 1.2, x + r, y + r * 1.2], fill=int(rng.uniform(200, 240)))
        draw.ellipse([x - r * 0.55, y - r * 0.65, x + r * 0.55, y + r * 0.65], fill=30)
    elif name == "meningioma":
        r = size * rng.uniform(0.08, 0.11)
        angle = rng.uniform(-2.6, -0.5) if rng.uniform() < 0.5 else rng.uniform(0.5, 2.6)
        x, y = cx + (rx - r * 0.6) * math.sin(angle), cy - (ry - r * 0.6) * math.cos(angle)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(220, 255)))
    elif name == "pituitary":
        r = size * rng.uniform(0.045, 0.065)
        x, y = cx + rng.uniform(-2, 2), cy + ry * rng.uniform(0.45, 0.6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(220, 255)))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # mode L


def write_synthetic_dataset(out_dir, per_class=60, seed=0, size=96):
    """Kaggle layout with per_class training and max(per_class // 4, 5) test images per class."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"{out_dir}: folder is not empty; choose a new --out")
    rng = np.random.default_rng(seed)
    for split, count in (("Training", per_class), ("Testing", max(per_class // 4, 5))):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                synth_image(label, rng, size).save(os.path.join(folder, f"{name}_{i:04d}.jpg"),
                                                   quality=95)
    return out_dir


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a small synthetic MRI-like dataset")
    synth.add_argument("--out", required=True, help="new folder to write (Kaggle layout)")
    synth.add_argument("--per-class", type=int, default=60,
                       help="training images per class (test gets a quarter, at least 5)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            write_synthetic_dataset(args.out, args.per_class, args.seed)
            print(f"wrote {args.out}: Training/ and Testing/ with {', '.join(CLASSES)}")
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
