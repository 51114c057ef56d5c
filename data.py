"""Data for tumor-vlm: find the images, split them, decode them, make augmented views.

    python data.py synth --out ./synth --per-class 60     # a small learnable MRI-like dataset
    python data.py audit --data DIR --out OUT             # test images that copy training ones
    python data.py split --data DIR --out split.csv --leak-free   # split that keeps copies together
    python data.py merge SRC... --out ./merged            # several datasets into one layout

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


def official_split_folders(root):
    """(Training folder, Testing folder) as named on disk when root has both, else None."""
    found = {SPLIT_FOLDERS[f.lower()]: f for f in visible_subfolders(root)
             if f.lower() in SPLIT_FOLDERS}
    return (found["train"], found["test"]) if set(found) == {"train", "test"} else None


def files_under(folder):
    """(image files, other files) under folder, recursively and sorted; hidden ones ignored."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(n for n in filenames if not is_hidden(n)):
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            (images if is_image else others).append(os.path.join(dirpath, name))
    return images, others


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
    relative = lambda path: os.path.relpath(path, data_dir).replace(os.sep, "/")
    samples, non_images = [], []
    for folder in folders:
        label = CLASSES.index(normalise_class_name(folder))
        images, others = files_under(os.path.join(root, folder))
        samples += [Sample(relative(path), label) for path in images]
        non_images += [relative(path) for path in others]
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
    official = official_split_folders(data_dir)
    if official:
        train, non_train = scan_class_folders(data_dir, official[0])
        test, non_test = scan_class_folders(data_dir, official[1])
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


# ---- Leak audit, leak-free split, merge (issue 6) ----------------------------------------------
#
# The official Kaggle split is not clean: test images come back in training as identical files,
# as mirrored or rotated copies, as copies with other contrast or re-encoded, and as neighbouring
# slices of the same patient. `python data.py audit` finds them, `python data.py split
# --leak-free` writes a split where each group of copies lies in one part,
# `test_paths_with_train_copy` lets a training run also report accuracy on the official test
# images that have no copy in training, and `python data.py merge` joins several releases.
#
# How a pair is scored. Each image is decoded once (load_rgb) to a 64 x 64 grey thumbnail (an
# exact area average, which commutes with flips). Its signature is a local contrast
# normalisation (LCN) of that thumbnail: subtract a Gaussian local mean and divide by the local
# standard deviation. LCN removes brightness, contrast and other smooth intensity changes
# (windowing, gamma, most sharpening) and keeps where the anatomy's edges are, which is what tells
# a copy from a neighbouring slice. The score of a pair (a, b) is the largest correlation between
# b's signature and any of the 8 flips/rotations of a's (the dihedral group D4). Every pair is
# compared, with no candidate stage that could miss one: 7,000 x 8 x 7,000 / 2 dot products of
# 4,096-vectors (~1.6 TFLOP) take 20-40 s of float32 matrix products on 2 CPU cores. Identical
# decoded pixels (a hash of the RGB array) are `exact`, whatever the score.
#
# Calibration on the Kaggle copy (7,019 images; figures in README "Leak audit"), from contact
# sheets of narrow score bands: in glioma, meningioma and pituitary the scores fall in two groups,
# neighbouring slices of one patient at 0.50-0.87 and copies at >= 0.92 (mirrored ones at ~1.0),
# with no pair in 0.88-0.92. In notumor (Br35H-derived, with sharpened and contrast-stretched
# copies) scores run on from ~0.80 to 1; every pair looked at from 0.86 up was the same picture.
# Hence COPY_THRESHOLD = 0.90 (a copy for sure; some processed notumor copies fall below it and
# are reported as similar) and SIMILAR_THRESHOLD = 0.50 (below it, mostly different patients).

LEAK_THUMB_SIZE = 64        # side of the grey thumbnail that signatures are computed on
LEAK_LCN_SIGMA = 2.0        # pixels (at 64 x 64): scale of the LCN's local mean and std
LEAK_LCN_FLOOR = 0.3        # floor of the local std, in units of the image's global std: keeps
                            # JPEG noise in flat black background from being blown up by LCN
COPY_THRESHOLD = 0.90       # score >= this: the same image after flip/rotation/intensity/JPEG
SIMILAR_THRESHOLD = 0.50    # score in [0.50, 0.90): alike, probably a neighbouring slice
LEAK_CACHE_FILE = "leak_signatures.npz"   # per-image signatures, keyed by file content SHA-1
PAIR_COLUMNS = ("a_path", "b_path", "a_label", "b_label", "transform", "score", "kind")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)         # train / val / test of `data.py split`
SPLIT_PARTS = ("train", "val", "test")

# The 8 elements of D4 acting on (..., H, W) tensors. A pair's `transform` names the T with
# T(a) ~ b (up to intensity), e.g. flip_lr: b is a mirrored left-right.
D4_TRANSFORMS = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),    # counter-clockwise, as np.rot90
    "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
    "flip_lr": lambda x: x.flip(-1),
    "flip_ud": lambda x: x.flip(-2),
    "transpose": lambda x: x.transpose(-2, -1),        # mirror about the main diagonal
    "anti_transpose": lambda x: torch.rot90(x, 2, (-2, -1)).transpose(-2, -1),
}
D4_NAMES = tuple(D4_TRANSFORMS)


def pixel_hash(image):
    """SHA-1 of an image's decoded RGB pixels and shape: equal iff the decoded images are equal."""
    pixels = np.asarray(image.convert("RGB"))
    return hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def area_resize(grey, size):
    """(H, W) array -> (size, size) float64: each output cell is the input's mean over the cell's
    exact footprint (fractional edges included), i.e. area resampling.

    Computed per axis from the running sum, which is exact for a piecewise-constant image and
    uses no BLAS (which crawls when other jobs load the machine). It is mirror-symmetric, so it
    commutes with flips and rotations; PIL's BOX filter rounds the footprint edges for
    non-integer ratios (224 -> 64 is 3.5) and does not: a mirrored copy scored ~0.985, not 1.
    """
    resized = np.asarray(grey, dtype=np.float64)
    for axis in (0, 1):
        n = resized.shape[axis]
        edges = np.arange(size + 1) * (n / size)            # footprint edges, in input cells
        cell = np.minimum(np.floor(edges).astype(int), n - 1)
        fraction = np.expand_dims(edges - cell, 1 - axis)   # broadcast along the other axis
        running = np.cumsum(resized, axis) - resized        # sum of the cells before each cell
        integral = (np.take(running, cell, axis) + fraction * np.take(resized, cell, axis))
        resized = np.diff(integral, axis=axis) / (n / size)
    return resized


def image_signature(path):
    """(pixel hash, (64, 64) uint8 grey thumbnail, area-averaged) of one image file."""
    image = load_rgb(path)
    thumbnail = area_resize(np.asarray(image.convert("L")), LEAK_THUMB_SIZE)
    return pixel_hash(image), thumbnail.round().clip(0, 255).astype(np.uint8)


def load_signatures(data_dir, paths, cache_dir=None, progress=True):
    """Pixel hashes and thumbnails of data_dir/<path> for each path, reusing a cache if given.

    The cache, cache_dir/leak_signatures.npz, is keyed by the SHA-1 of each file's bytes, so a
    moved or renamed file still hits and an edited one misses. Only missing images are decoded;
    the cache is then rewritten (to a temporary file, then renamed, so concurrent runs never read
    half a file). Returns (file SHA-1s, pixel hashes, (N, 64, 64) uint8 thumbnails).
    """
    from tqdm import tqdm
    file_keys = [file_hash(os.path.join(data_dir, p)) for p in paths]
    cache_file = os.path.join(cache_dir, LEAK_CACHE_FILE) if cache_dir else None
    cached = {}  # file SHA-1 -> (pixel hash, thumbnail)
    if cache_file and os.path.isfile(cache_file):
        with np.load(cache_file) as stored:
            if stored["thumbnails"].shape[1:] == (LEAK_THUMB_SIZE, LEAK_THUMB_SIZE):
                cached = dict(zip(stored["file_keys"].tolist(),
                                  zip(stored["pixel_hashes"].tolist(), stored["thumbnails"])))
    missing = sorted({(key, p) for key, p in zip(file_keys, paths) if key not in cached})
    done_keys = set()
    for key, p in tqdm(missing, desc="decoding images", unit="img", disable=not progress):
        if key not in done_keys:  # byte-identical files are decoded once
            cached[key] = image_signature(os.path.join(data_dir, p))
            done_keys.add(key)
    if cache_file and missing:
        os.makedirs(cache_dir, exist_ok=True)
        keys = sorted(cached)
        temporary = f"{cache_file}.{os.getpid()}.tmp.npz"
        np.savez(temporary, file_keys=np.array(keys), pixel_hashes=np.array(
            [cached[k][0] for k in keys]), thumbnails=np.stack([cached[k][1] for k in keys]))
        os.replace(temporary, cache_file)
    hashes = [cached[key][0] for key in file_keys]
    thumbnails = np.stack([cached[key][1] for key in file_keys]) if paths else \
        np.zeros((0, LEAK_THUMB_SIZE, LEAK_THUMB_SIZE), np.uint8)
    return file_keys, hashes, thumbnails


def gaussian_blur(images, sigma):
    """(N, H, W) -> (N, H, W): separable Gaussian blur with replicated edges.

    The kernel is symmetric and the padding is the same on every side, so blurring commutes with
    the D4 flips and rotations; that is what lets us transform signatures instead of images.
    """
    radius = int(math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    x = images[:, None]  # (N, 1, H, W)
    x = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1))
    x = torch.nn.functional.pad(x, (0, 0, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1))
    return x[:, 0]


def lcn_signatures(thumbnails):
    """(N, S, S) uint8 thumbnails -> (N, S, S) float32 LCN signatures, each of zero mean and norm 1.

    A signature is unchanged by b -> alpha * b + beta (alpha > 0): the global std is divided out
    first, then the local mean subtracted and the local std divided out. A flat image (no
    contrast at all) gets the zero signature and so scores 0 against everything.
    """
    signatures = []
    for start in range(0, len(thumbnails), 512):  # chunks: conv2d's buffers grow with the batch
        x = torch.from_numpy(np.asarray(thumbnails[start:start + 512], dtype=np.float32))
        x = x / x.flatten(1).std(1).clamp_min(1e-3)[:, None, None]   # global contrast -> 1
        local_mean = gaussian_blur(x, LEAK_LCN_SIGMA)
        local_std = gaussian_blur((x - local_mean) ** 2, LEAK_LCN_SIGMA).sqrt()
        lcn = (x - local_mean) / local_std.clamp_min(LEAK_LCN_FLOOR)
        lcn = lcn - lcn.mean((1, 2), keepdim=True)
        signatures.append(lcn / lcn.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None])
    size = LEAK_THUMB_SIZE if not len(thumbnails) else thumbnails.shape[-1]
    return torch.cat(signatures) if signatures else torch.zeros(0, size, size)


def matching_pairs(signatures_a, signatures_b=None, threshold=SIMILAR_THRESHOLD, progress=True,
                   rows_per_chunk=256):
    """Every pair whose D4-aligned signature correlation is >= threshold.

    signatures_a (N, S, S), signatures_b (M, S, S) from lcn_signatures. With signatures_b=None the
    pairs (i, j), i < j, within signatures_a; else every (i in a, j in b).
    score(i, j) = max over T in D4 of <T(a_i), b_j> (a correlation: both have mean 0, norm 1).
    Returns int64 arrays i, j, int8 array transform (index into D4_NAMES: T(a_i) ~ b_j) and
    float32 array score.
    """
    from tqdm import tqdm
    within = signatures_b is None
    columns = (signatures_a if within else signatures_b).flatten(1)  # (M, S*S)
    found_i, found_j, found_t, found_s = [], [], [], []
    chunks = range(0, len(signatures_a), rows_per_chunk)
    for start in tqdm(chunks, desc="comparing pairs", unit="chunk", disable=not progress):
        rows = signatures_a[start:start + rows_per_chunk]                      # (c, S, S)
        first_column = start if within else 0  # within one set, only j >= start can have j > i
        transformed = torch.stack([t(rows) for t in D4_TRANSFORMS.values()])  # (8, c, S, S)
        scores = transformed.flatten(2) @ columns[first_column:].T            # (8, c, M')
        best, transform = scores.max(0)                                        # (c, M')
        keep = best >= threshold
        if within:  # drop j <= i (the diagonal and the pairs counted from the other side)
            i_index = torch.arange(start, start + len(rows))[:, None]
            j_index = torch.arange(first_column, len(columns))[None, :]
            keep &= j_index > i_index
        ii, jj = keep.nonzero(as_tuple=True)
        found_i.append(ii + start)
        found_j.append(jj + first_column)
        found_t.append(transform[ii, jj].to(torch.int8))
        found_s.append(best[ii, jj])
    if not found_i:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8),
                np.zeros(0, np.float32))
    return tuple(torch.cat(x).numpy() for x in (found_i, found_j, found_t, found_s))


def intensity_changed(thumbnail_a, thumbnail_b, transform):
    """True when b's grey levels are not a's (after the D4 transform) up to JPEG noise.

    Least-squares fit b ~ gain * T(a) + offset on the 64 x 64 thumbnails; a plain re-encoding
    keeps gain ~ 1, offset ~ 0 and a correlation above 0.98.
    """
    a = D4_TRANSFORMS[transform](torch.from_numpy(thumbnail_a.astype(np.float64))).flatten()
    b = torch.from_numpy(thumbnail_b.astype(np.float64)).flatten()
    a_centred, b_centred = a - a.mean(), b - b.mean()
    variance_a = float((a_centred ** 2).sum())
    if variance_a == 0:
        return bool(b.std() > 2 or abs(b.mean() - a.mean()) > 8)
    gain = float((a_centred * b_centred).sum()) / variance_a
    offset = float(b.mean() - gain * a.mean())
    correlation = float((a_centred * b_centred).sum()
                        / (a_centred.norm() * b_centred.norm() + 1e-9))
    return abs(gain - 1) > 0.1 or abs(offset) > 8 or correlation < 0.98


def find_audit_images(data_dir):
    """[(path, class name, split folder)] for --data DIR; split folder is "" for class folders.

    Kaggle layout: split folder "Training"/"Testing" as named on disk. Hidden files and folders
    (e.g. .ipynb_checkpoints/) are ignored by scan_class_folders.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such folder; pass --data with the dataset folder")
    parts = list(official_split_folders(data_dir) or [""])
    images = []
    for part in parts:
        samples, _ = scan_class_folders(data_dir, part)
        images += [(s.path, CLASSES[s.label], part) for s in samples]
    return images


def audit_pairs(data_dir, paths, labels, cache_dir=None, progress=True):
    """Rows (dicts with PAIR_COLUMNS) for every pair that is exact, transformed or similar.

    kind: `exact` = identical decoded pixels; `transformed` = score >= COPY_THRESHOLD (the same
    picture flipped/rotated, with other intensities or re-encoded); `similar` = score in
    [SIMILAR_THRESHOLD, COPY_THRESHOLD) (alike, probably another slice; not a copy).
    transform: the D4 element mapping a onto b, plus "+intensity" when grey levels changed.
    """
    file_keys, hashes, thumbnails = load_signatures(data_dir, paths, cache_dir, progress)
    signatures = lcn_signatures(thumbnails)
    found = {}  # (i, j), i < j -> (kind, transform, score)
    for i, j, t, score in zip(*matching_pairs(signatures, None, SIMILAR_THRESHOLD, progress)):
        kind = "transformed" if score >= COPY_THRESHOLD else "similar"
        # 4 decimals, rounded down so a written score never reaches the next kind's threshold
        found[int(i), int(j)] = (kind, D4_NAMES[t], math.floor(float(score) * 1e4) / 1e4)
    members = {}  # identical decoded pixels are exact even when the score is not (flat images)
    for index, digest in enumerate(hashes):
        members.setdefault(digest, []).append(index)
    for group in members.values():
        for position, i in enumerate(group):
            for j in group[position + 1:]:
                found[i, j] = ("exact", "identity", 1.0)
    if cache_dir:  # lets test_paths_with_train_copy answer without comparing anything again
        store_copy_links(cache_dir, file_keys, [(file_keys[i], file_keys[j]) for (i, j), value
                                                in found.items() if value[0] != "similar"])
    rows = []
    for (i, j), (kind, transform, score) in sorted(found.items()):
        if kind != "exact" and intensity_changed(thumbnails[i], thumbnails[j], transform):
            transform += "+intensity"
        rows.append({"a_path": paths[i], "b_path": paths[j], "a_label": labels[i],
                     "b_label": labels[j], "transform": transform, "score": score,
                     "kind": kind})
    return rows


def union_find_groups(n_items, links):
    """Group index (0..G-1, in order of first member) of each of n_items, linked by (i, j) pairs."""
    parent = list(range(n_items))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j in links:
        root_i, root_j = root(i), root(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    group_of_root = {}
    return [group_of_root.setdefault(root(i), len(group_of_root)) for i in range(n_items)]


def summarise_audit(images, rows, runtime_s):
    """summary.json content: pair counts within/across splits and per class, label conflicts,
    redundant copies within each split, and the share of test images with a copy in training."""
    split_of = {path: part for path, _, part in images}
    label_of = {path: label for path, label, _ in images}
    kinds = ("exact", "transformed", "similar")
    splits = sorted({part for _, _, part in images})
    where = lambda row: (f"within {split_of[row['a_path']] or 'all'}"
                         if split_of[row["a_path"]] == split_of[row["b_path"]] else "across splits")
    pairs = {kind: {} for kind in kinds}
    per_class = {name: {kind: 0 for kind in kinds} for name in CLASSES}
    conflicts = {kind: 0 for kind in kinds}
    conflict_examples = []
    for row in rows:
        counts = pairs[row["kind"]]
        counts[where(row)] = counts.get(where(row), 0) + 1
        if row["a_label"] == row["b_label"]:
            per_class[row["a_label"]][row["kind"]] += 1
        else:
            conflicts[row["kind"]] += 1
            if row["kind"] != "similar" and len(conflict_examples) < 20:
                conflict_examples.append({k: row[k] for k in PAIR_COLUMNS})

    def redundant(part, copy_kinds):  # images minus groups: how many could be deleted
        paths = [p for p, _, s in images if s == part]
        index = {p: k for k, p in enumerate(paths)}
        links = [(index[r["a_path"]], index[r["b_path"]]) for r in rows if r["kind"] in copy_kinds
                 and split_of[r["a_path"]] == part == split_of[r["b_path"]]]
        groups = union_find_groups(len(paths), links)
        return len(paths) - (max(groups) + 1 if groups else 0)

    summary = {
        "images": {part or "all": sum(1 for *_, s in images if s == part) for part in splits},
        "runtime_s": round(runtime_s, 1),
        "thresholds": {"copy": COPY_THRESHOLD, "similar": SIMILAR_THRESHOLD},
        "pairs": pairs,
        "pairs_per_class": per_class,
        "label_conflicts": {"pairs": conflicts, "examples": conflict_examples},
        "redundant_within_split": {
            part or "all": {"exact": redundant(part, {"exact"}),
                            "exact_or_transformed": redundant(part, {"exact", "transformed"})}
            for part in splits},
    }
    train_part = next((s for s in splits if SPLIT_FOLDERS.get(s.lower()) == "train"), None)
    test_part = next((s for s in splits if SPLIT_FOLDERS.get(s.lower()) == "test"), None)
    if train_part and test_part:
        best_kind = {}  # test path -> strongest kind of link to any training image
        rank = {"similar": 1, "transformed": 2, "exact": 3}
        for row in rows:
            ends = {split_of[row["a_path"]]: row["a_path"], split_of[row["b_path"]]: row["b_path"]}
            if set(ends) == {train_part, test_part}:
                test_path = ends[test_part]
                if rank[row["kind"]] > rank.get(best_kind.get(test_path), 0):
                    best_kind[test_path] = row["kind"]

        def shares(test_paths):
            n = len(test_paths)
            count = lambda ks: sum(1 for p in test_paths if best_kind.get(p) in ks)
            figures = {"test_images": n,
                       "with_exact_copy": count({"exact"}),
                       "with_transformed_copy_only": count({"transformed"}),
                       "with_copy": count({"exact", "transformed"}),
                       "with_similar_only": count({"similar"}),
                       "leak_free": n - count({"exact", "transformed"})}
            figures["share_with_copy"] = round(figures["with_copy"] / n, 4) if n else None
            figures["share_with_copy_or_similar"] = round(
                count({"exact", "transformed", "similar"}) / n, 4) if n else None
            return figures

        test_paths = [p for p, _, s in images if s == test_part]
        summary["test_with_train_copy"] = {
            "overall": shares(test_paths),
            "per_class": {name: shares([p for p in test_paths if label_of[p] == name])
                          for name in CLASSES}}
    return summary


def write_contact_sheet(data_dir, rows, out_path, title, max_pairs=12):
    """PNG of up to max_pairs pairs (a left, b right), captioned with names, labels, transform
    and score. Pairs across splits are preferred (they are the leaks) and picked at evenly spaced
    score ranks, lowest first, so the borderline pairs near a threshold are always on the sheet."""
    from PIL import ImageFont
    across = [r for r in rows if r["a_path"].split("/")[0] != r["b_path"].split("/")[0]]
    pool = sorted(across if len(across) >= max_pairs else rows, key=lambda r: r["score"])
    picks = np.unique(np.linspace(0, len(pool) - 1, min(max_pairs, len(pool))).round())
    chosen = [pool[int(k)] for k in picks] if pool else []
    tile, caption, columns = 160, 40, 3  # pixels; 3 pairs per row
    n_rows = max(1, math.ceil(len(chosen) / columns))
    sheet = Image.new("RGB", (columns * (2 * tile + 12), 24 + n_rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 4), f"{title}: {len(rows)} pairs, {len(chosen)} shown", fill="black", font=font)
    for k, row in enumerate(chosen):
        x, y = (k % columns) * (2 * tile + 12), 24 + (k // columns) * (tile + caption)
        for offset, key in ((0, "a_path"), (tile, "b_path")):
            image = load_rgb(os.path.join(data_dir, row[key])).resize((tile, tile), Image.BILINEAR)
            sheet.paste(image, (x + offset, y))
        short = lambda p: "/".join(p.split("/")[::2])  # Testing/glioma/x.jpg -> Testing/x.jpg
        draw.text((x, y + tile + 2), f"a {short(row['a_path'])} ({row['a_label']})", fill="black",
                  font=font)
        draw.text((x, y + tile + 14), f"b {short(row['b_path'])} ({row['b_label']})", fill="black",
                  font=font)
        draw.text((x, y + tile + 26), f"{row['transform']}  score {row['score']:.3f}",
                  fill="black", font=font)
    sheet.save(out_path)


def plot_score_histogram(rows, out_path):
    """Histogram of pair scores (log count) with the two thresholds: the calibration picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 3.5))
    scores = [r["score"] for r in rows if r["kind"] != "exact"]
    axes.hist(scores, bins=np.linspace(SIMILAR_THRESHOLD, 1, 51), color="grey")
    for threshold in (SIMILAR_THRESHOLD, COPY_THRESHOLD):
        axes.axvline(threshold, color="red", linestyle="--")
    axes.set_yscale("log")
    axes.set_xlabel("score (D4-aligned LCN correlation)")
    axes.set_ylabel("pairs (not exact)")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def run_audit(data_dir, out_dir, cache_dir=None, progress=True):
    """`data.py audit`: write pairs.csv, summary.json, contact sheets and the score histogram."""
    import json
    import time
    started = time.time()
    images = find_audit_images(data_dir)
    paths, labels = [p for p, _, _ in images], [label for _, label, _ in images]
    os.makedirs(out_dir, exist_ok=True)
    rows = audit_pairs(data_dir, paths, labels, cache_dir or out_dir, progress)
    with open(os.path.join(out_dir, "pairs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PAIR_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for kind in ("exact", "transformed", "similar"):
        write_contact_sheet(data_dir, [r for r in rows if r["kind"] == kind],
                            os.path.join(out_dir, f"contact_{kind}.png"), kind)
    plot_score_histogram(rows, os.path.join(out_dir, "score_histogram.png"))
    summary = summarise_audit(images, rows, time.time() - started)
    summary["data"] = os.path.abspath(data_dir)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def print_audit_summary(summary, out_dir):
    """The headline figures of summary.json, for the terminal."""
    print(f"{sum(summary['images'].values())} images {summary['images']}, "
          f"{summary['runtime_s']} s; wrote {out_dir}/pairs.csv, summary.json, contact_*.png")
    for kind, counts in summary["pairs"].items():
        print(f"  {kind:12s} pairs: {counts}")
    print(f"  label conflicts (pairs): {summary['label_conflicts']['pairs']}")
    print(f"  redundant copies within a split: {summary['redundant_within_split']}")
    if "test_with_train_copy" in summary:
        overall = summary["test_with_train_copy"]["overall"]
        print(f"  test images with a copy in training: {overall['with_copy']} of "
              f"{overall['test_images']} ({100 * overall['share_with_copy']:.1f} %; exact "
              f"{overall['with_exact_copy']}, transformed only "
              f"{overall['with_transformed_copy_only']}); similar only: "
              f"{overall['with_similar_only']}")
        for name, figures in summary["test_with_train_copy"]["per_class"].items():
            print(f"    {name:11s} {figures['with_copy']:4d} of {figures['test_images']:4d}"
                  f" ({100 * (figures['share_with_copy'] or 0):.1f} %)")


def copy_links_file(cache_dir, file_keys):
    """Path of the stored copy links for this set of files and these audit settings."""
    settings = f"{LEAK_THUMB_SIZE}|{LEAK_LCN_SIGMA}|{LEAK_LCN_FLOOR}|{COPY_THRESHOLD}"
    digest = hashlib.sha1("|".join([settings] + sorted(set(file_keys))).encode()).hexdigest()
    return os.path.join(cache_dir, f"leak_links_{digest[:16]}.npz")


def store_copy_links(cache_dir, file_keys, links):
    """Save which files (by content SHA-1) were all compared and which pairs are copies."""
    keys = sorted(set(file_keys))
    index = {key: k for k, key in enumerate(keys)}
    pairs = np.array([(index[a], index[b]) for a, b in links if a != b], dtype=np.int64)
    os.makedirs(cache_dir, exist_ok=True)
    path = copy_links_file(cache_dir, keys)
    temporary = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(temporary, file_keys=np.array(keys), pairs=pairs.reshape(-1, 2))
    os.replace(temporary, path)


def load_copy_links(cache_dir, file_keys):
    """Copy links {(key, key)} from a stored comparison that covered every key, else None."""
    import glob
    wanted = set(file_keys)
    for path in sorted(glob.glob(os.path.join(cache_dir, "leak_links_*.npz"))):
        if path.endswith(".tmp.npz"):
            continue
        with np.load(path) as stored:
            keys = stored["file_keys"].tolist()
            if not wanted <= set(keys) or copy_links_file(cache_dir, keys) != path:
                continue  # another file set, or made with other settings
            pairs = stored["pairs"]
        return {(keys[a], keys[b]) for a, b in pairs} | {(keys[b], keys[a]) for a, b in pairs}
    return None


def test_paths_with_train_copy(data_dir, train_paths, test_paths, cache_dir=None, exclude=()):
    """The test paths (same strings as given) with an exact or transformed copy in train_paths.

    Accuracy on the other test paths is the leak-free figure. The first call compares every image
    under data_dir (plus the given paths) with every other, as the audit does (~30 s for the
    7,000 Kaggle images on 2 CPU cores); with cache_dir it stores signatures and the copy links
    there, and later calls (any train/test subsets of those files, e.g. other seeds' validation
    carve-outs) only hash the files and look the links up: ~1 s. `data.py audit --cache DIR`
    fills the same cache. `exclude`: paths not to decode (undecodable images skipped by a run).
    """
    train_paths, test_paths = list(train_paths), list(test_paths)
    if not train_paths or not test_paths:
        return set()
    train_keys = {file_hash(os.path.join(data_dir, p)) for p in train_paths}
    test_keys = [file_hash(os.path.join(data_dir, p)) for p in test_paths]
    links = load_copy_links(cache_dir, train_keys | set(test_keys)) if cache_dir else None
    if links is None:
        try:  # compare the whole folder once, so every later split of it is a cache hit
            every_path = [p for p, _, _ in find_audit_images(data_dir)]
        except DataError:
            every_path = []
        paths = sorted((set(every_path) - set(exclude)) | set(train_paths) | set(test_paths))
        file_keys, hashes, thumbnails = load_signatures(data_dir, paths, cache_dir, progress=False)
        i, j, _, _ = matching_pairs(lcn_signatures(thumbnails), None, COPY_THRESHOLD,
                                    progress=False)
        members = {}  # identical decoded pixels: exact copies even where the score is not high
        for key, digest in zip(file_keys, hashes):
            members.setdefault(digest, set()).add(key)
        pairs = [(file_keys[a], file_keys[b]) for a, b in zip(i.tolist(), j.tolist())]
        pairs += [(a, b) for group in members.values() for a in group for b in group if a < b]
        if cache_dir:
            store_copy_links(cache_dir, file_keys, pairs)
        links = set(pairs) | {(b, a) for a, b in pairs}
    copied = {key for key in test_keys if key in train_keys}  # byte-identical files
    copied |= {a for a, b in links if b in train_keys}
    return {path for path, key in zip(test_paths, test_keys) if key in copied}


# ---- leak-free split ----

def assign_groups_to_parts(group_labels, group_sizes, fractions, seed):
    """Part index (0..len(fractions)-1) of each group, stratified by group label.

    Within each label the groups are visited in seeded random order; each goes to the part
    furthest below its target (fraction x images of that label). Whole groups move, so a part
    can overshoot its target by at most one group.
    """
    rng = np.random.default_rng(seed)
    part_of_group = [0] * len(group_labels)
    for label in sorted(set(group_labels)):
        groups = [g for g, lab in enumerate(group_labels) if lab == label]
        total = sum(group_sizes[g] for g in groups)
        filled = [0] * len(fractions)
        for g in (groups[k] for k in rng.permutation(len(groups))):
            part = max(range(len(fractions)), key=lambda p: fractions[p] * total - filled[p])
            part_of_group[g] = part
            filled[part] += group_sizes[g]
    return part_of_group


def make_split(data_dir, seed, leak_free=True, strict=False, cache_dir=None, progress=True):
    """Rows (path, label, part) for every image under data_dir, part in train/val/test, 80/10/10,
    and the group index of each image (one group per image without leak_free).

    leak_free: images linked by exact or transformed pairs (strict: similar pairs too) form one
    group via union-find, and whole groups are assigned, stratified by the group's majority label
    (each image keeps its own label). Otherwise a plain stratified per-image split.
    """
    images = find_audit_images(data_dir)
    paths, labels = [p for p, _, _ in images], [label for _, label, _ in images]
    links = []
    if leak_free:
        index = {p: k for k, p in enumerate(paths)}
        linking_kinds = {"exact", "transformed", "similar"} if strict else {"exact", "transformed"}
        links = [(index[r["a_path"]], index[r["b_path"]])
                 for r in audit_pairs(data_dir, paths, labels, cache_dir, progress)
                 if r["kind"] in linking_kinds]
    group_of = union_find_groups(len(paths), links)
    n_groups = max(group_of) + 1 if group_of else 0
    member_labels = [[] for _ in range(n_groups)]
    for image, group in enumerate(group_of):
        member_labels[group].append(CLASSES.index(labels[image]))
    # majority label, ties to the first class in CLASSES order (deterministic)
    group_labels = [int(np.bincount(m, minlength=len(CLASSES)).argmax()) for m in member_labels]
    group_sizes = [len(m) for m in member_labels]
    part_of_group = assign_groups_to_parts(group_labels, group_sizes, SPLIT_FRACTIONS, seed)
    return [(p, label, SPLIT_PARTS[part_of_group[group_of[k]]])
            for k, (p, label) in enumerate(zip(paths, labels))], group_of


def write_split_csv(split_rows, out_path):
    """Write (path, label, split) rows as the CSV that `--split` and read_split_csv read."""
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with open(out_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(split_rows)


# ---- merging datasets ----

UNLABELLED_FOLDERS = {  # folder name (lower case) -> why its images are skipped
    "yes": "Br35H 'yes' = tumour of unknown type, no 4-class label",
    "pred": "Br35H 'pred' = unlabelled images",
}


def merge_source_items(source):
    """[(source file, class or None, split folder or "", skip reason or "")] of one source.

    A source is the Kaggle layout (Training/ and Testing/ holding class folders), or class
    folders directly (figshare exported to folders, Br35H's no/ and yes/, any <class>/ folders).
    """
    if not os.path.isdir(source):
        raise DataError(f"{source}: no such folder; each merge source must be a dataset folder")
    official = official_split_folders(source)
    parts = [("Training", official[0]), ("Testing", official[1])] if official else [("", "")]
    items = []
    for part_name, part_folder in parts:
        root = os.path.join(source, part_folder)
        folders = visible_subfolders(root)
        unknown = [f for f in folders if normalise_class_name(f) is None
                   and f.lower() not in UNLABELLED_FOLDERS]
        if unknown or not folders:
            raise DataError(
                f"{root}: found {', '.join(f + '/' for f in folders) or 'nothing'}; expected "
                f"class folders glioma/ meningioma/ notumor/ pituitary/ (or aliases, Br35H's "
                f"no/ and yes/), or Training/ and Testing/ folders that contain them")
        for folder in folders:
            label = normalise_class_name(folder)
            reason = "" if label else UNLABELLED_FOLDERS[folder.lower()]
            items += [(path, label, part_name, reason)
                      for path in files_under(os.path.join(root, folder))[0]]
    return items, official is not None


def merge_datasets(sources, out_dir, progress=True):
    """`data.py merge`: copy the images of several sources into out_dir without duplicates.

    Layout: out_dir/Training/<class>/ and out_dir/Testing/<class>/ when every source has the
    official split (each image keeps its part), else out_dir/<class>/ (then split with `data.py
    split --leak-free`): a half-split folder would mix images that were never meant as tests.
    Files are copied byte for byte. An image whose decoded pixels equal an earlier one's
    (sources in the given order, Training before Testing, paths sorted) is not copied. A name
    already taken gets the source's folder name as prefix (then _2, _3, ...). Writes
    out_dir/manifest.csv: dest_path, source_path, source_dataset, label, status (copied,
    duplicate_of:<dest_path>, skipped:<reason>). Returns the manifest rows.
    """
    import shutil
    from tqdm import tqdm
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir}: exists and is not an empty folder; choose a new --out")
    per_source, dataset_names = [], []
    for source in sources:
        items, official = merge_source_items(source)
        name = os.path.basename(os.path.normpath(source)) or "source"
        while name in dataset_names:  # two sources called "data": data, data_2
            name = f"{name}_2" if not name[-1].isdigit() else f"{name[:-1]}{int(name[-1]) + 1}"
        per_source.append((name, items, official))
        dataset_names.append(name)
    keep_split = all(official for _, _, official in per_source)
    if not keep_split and any(official for _, _, official in per_source):
        print("merge: not every source has Training/ and Testing/, so the official split is "
              f"dropped: writing {out_dir}/<class>/ (make a split with `data.py split`)")
    manifest, first_copy, taken = [], {}, set()  # pixel hash -> (dest path, label); dest paths
    label_conflicts = 0
    for name, items, _ in per_source:
        skipped = {}
        for path, label, part, reason in tqdm(items, desc=f"merging {name}", unit="img",
                                              disable=not progress):
            row = {"dest_path": "", "source_path": path, "source_dataset": name,
                   "label": label or ""}
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                manifest.append({**row, "status": f"skipped:{reason}"})
                continue
            try:
                digest = pixel_hash(load_rgb(path))
            except DataError as error:
                print(f"merge: skipped {error}")
                manifest.append({**row, "status": "skipped:cannot decode image"})
                continue
            if digest in first_copy:
                first_dest, first_label = first_copy[digest]
                label_conflicts += first_label != label
                manifest.append({**row, "status": f"duplicate_of:{first_dest}"})
                continue
            folder = "/".join(f for f in ((part if keep_split else ""), label) if f)
            file_name = os.path.basename(path)
            dest = f"{folder}/{file_name}"
            if dest in taken:
                stem, extension = os.path.splitext(f"{name}_{file_name}")
                dest, copy_number = f"{folder}/{stem}{extension}", 2
                while dest in taken:
                    dest, copy_number = f"{folder}/{stem}_{copy_number}{extension}", copy_number + 1
            os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
            shutil.copyfile(path, os.path.join(out_dir, dest))
            taken.add(dest)
            first_copy[digest] = (dest, label)
            manifest.append({**row, "dest_path": dest, "status": "copied"})
        for reason, count in skipped.items():
            print(f"merge: skipped {count} images of {name}: {reason}")
    if label_conflicts:
        print(f"merge: {label_conflicts} duplicates carry another label than the copy kept; "
              f"see the label column of manifest.csv")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dest_path", "source_path", "source_dataset",
                                               "label", "status"])
        writer.writeheader()
        writer.writerows(manifest)
    return manifest


# ---- audit / split / merge commands ----

LEAK_COMMANDS = ("audit", "split", "merge")


def add_leak_commands(commands):
    """Register `audit`, `split` and `merge` on main()'s argparse subparsers."""
    audit = commands.add_parser("audit", help="find copies of images within and across splits")
    audit.add_argument("--data", required=True,
                       help="dataset folder: Training/ and Testing/ with class folders, or class "
                            "folders")
    audit.add_argument("--out", required=True,
                       help="folder for pairs.csv, summary.json, contact_*.png (keep it outside "
                            "the repository: it shows dataset images)")
    audit.add_argument("--cache", help="folder for the per-image signatures and copy links "
                                       "(default: --out); a training run's cache folder lets it "
                                       "reuse this audit")
    split = commands.add_parser("split", help="write a stratified 80/10/10 split CSV for --split")
    split.add_argument("--data", required=True, help="dataset folder (all its images are split)")
    split.add_argument("--out", required=True, help="CSV to write, columns path,label,split")
    split.add_argument("--leak-free", action="store_true",
                       help="keep each group of exact/transformed copies in one part")
    split.add_argument("--strict", action="store_true",
                       help="with --leak-free: group similar images (probably neighbouring "
                            "slices of one patient) too")
    split.add_argument("--seed", type=int, default=42, help="seed of the split")
    split.add_argument("--cache", help="folder for per-image signatures, reused by later calls")
    merge = commands.add_parser("merge", help="merge datasets into one folder, no duplicates")
    merge.add_argument("sources", nargs="+", metavar="SRC",
                       help="dataset folders: Kaggle layout, Br35H (no/ yes/), class folders")
    merge.add_argument("--out", required=True, help="new or empty folder to write")


def run_leak_command(args):
    """Run the `audit`, `split` or `merge` command parsed by main()."""
    if args.command == "audit":
        print_audit_summary(run_audit(args.data, args.out, args.cache), args.out)
    elif args.command == "split":
        if args.strict and not args.leak_free:
            raise DataError("--strict groups similar images for --leak-free; pass --leak-free too")
        rows, group_of = make_split(args.data, args.seed, args.leak_free, args.strict, args.cache)
        write_split_csv(rows, args.out)
        kind = ("leak-free, strict" if args.strict else "leak-free") if args.leak_free else "plain"
        sizes = np.bincount(group_of) if group_of else np.zeros(1, int)
        print(f"wrote {args.out}: {len(rows)} images, {kind} split (seed {args.seed}), "
              f"{len(sizes)} groups, largest {sizes.max()} images")
        for part in SPLIT_PARTS:
            counts = {name: sum(1 for _, label, p in rows if p == part and label == name)
                      for name in CLASSES}
            print(f"  {part:5s} {sum(counts.values()):5d}  {counts}")
    elif args.command == "merge":
        manifest = merge_datasets(args.sources, args.out)
        statuses = [row["status"].split(":")[0] for row in manifest]
        print(f"wrote {args.out}: {statuses.count('copied')} images copied, "
              f"{statuses.count('duplicate_of')} exact duplicates dropped, "
              f"{statuses.count('skipped')} skipped; see {args.out}/manifest.csv")


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a small synthetic MRI-like dataset")
    synth.add_argument("--out", required=True, help="new folder to write (Kaggle layout)")
    synth.add_argument("--per-class", type=int, default=60,
                       help="training images per class (test gets a quarter, at least 5)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    add_leak_commands(commands)  # audit, split, merge (issue 6)
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            write_synthetic_dataset(args.out, args.per_class, args.seed)
            print(f"wrote {args.out}: Training/ and Testing/ with {', '.join(CLASSES)}")
        elif args.command in LEAK_COMMANDS:
            run_leak_command(args)
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
