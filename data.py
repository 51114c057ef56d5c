"""Data for tumor-vlm: find the images, split them, decode them, make views, and find copies.

    python data.py synth --out ./synth --per-class 60      # MRI-like images, and lesions.csv
    python data.py audit --data DIR --out OUT              # test images that copy training ones
    python data.py split --data DIR --out split.csv --leak-free   # copies kept in one part
    python data.py merge SRC... --out ./merged             # several datasets, one copy per image

--data DIR: the Kaggle layout DIR/Training/<class>/ + DIR/Testing/<class>/ (the official split),
class folders DIR/<class>/ (stratified 80/20 by seed, as the paper's text says), or either with
--split CSV (path,label,split). Validation: a stratified, seeded part of training (default 10%).

Measured on the Kaggle release (7,019 images, 2 shared CPU cores): 994 of the 1,311 official test
images have an exact or transformed copy in Training (all 405 notumor ones), 317 are leak-free.
A run's leak check takes ~3 s once the image signatures are cached (~70 s the first time).
"""
import argparse
import csv
import glob
import hashlib
import itertools
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CLASS_ALIASES = {  # folder name, lower case with spaces/hyphens as "_" -> class
    "glioma_tumor": "glioma", "gliomas": "glioma", "meningioma_tumor": "meningioma",
    "meningiomas": "meningioma", "no_tumor": "notumor", "no": "notumor", "normal": "notumor",
    "healthy": "notumor", "no_tumour": "notumor", "notumour": "notumor",
    "pituitary_tumor": "pituitary", "pituitary_tumour": "pituitary", **{c: c for c in CLASSES}}
UNLABELLED_FOLDERS = {"yes": "Br35H yes/: tumour of unknown type", "pred": "Br35H pred/: no label"}
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


class DecodeError(ValueError):
    """An image file that cannot be decoded (the one error `--skip-bad` catches)."""


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


# ---- finding images ----------------------------------------------------------------------------

def normalise_class_name(name):
    """'No Tumor', 'no_tumor', 'glioma_tumor', ... -> a name in CLASSES, or None if unknown."""
    return CLASS_ALIASES.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def subfolders(folder):
    """Sorted subfolders, without hidden ones (.ipynb_checkpoints/, __MACOSX/)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()
                  and not entry.name.startswith(".") and entry.name != "__MACOSX")


def official_split_folders(root):
    """(Training folder, Testing folder) as named on disk when root has both, else None."""
    found = {SPLIT_FOLDERS[f.lower()]: f for f in subfolders(root) if f.lower() in SPLIT_FOLDERS}
    return (found["train"], found["test"]) if len(found) == 2 else None


def class_folder_files(root, also_allowed=()):
    """[(class folder, image files, other files)] under root (files found at any depth, sorted,
    hidden ones skipped). Unknown folder names are refused, except also_allowed (merge's)."""
    folders = subfolders(root)
    if not folders or any(not normalise_class_name(f) and f.lower() not in also_allowed
                          for f in folders):
        raise SystemExit(
            f"error: {root}: found {', '.join(f + '/' for f in folders) or 'nothing'}; expected "
            f"class folders glioma/ meningioma/ notumor/ pituitary/ (aliases such as no_tumor/, "
            f"no/, glioma_tumor/ are accepted), or Training/ and Testing/ folders holding them")
    found = []
    for folder in folders:
        pattern = os.path.join(glob.escape(os.path.join(root, folder)), "**", "*")
        files = [f for f in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(f)]
        is_image = {f: os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files}
        found.append((folder, [f for f in files if is_image[f]], [f for f in files if not is_image[f]]))
    return found


def find_images(data_dir, part=""):
    """(samples sorted by path, non-image files) under data_dir/part/<class>/."""
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: {data_dir}: no such folder; pass --data with the dataset folder")
    relative = lambda path: os.path.relpath(path, data_dir).replace(os.sep, "/")
    samples, non_images = [], []
    for folder, images, others in class_folder_files(os.path.join(data_dir, part)):
        label = CLASSES.index(normalise_class_name(folder))
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
        if not {"path", "label", "split"} <= set(reader.fieldnames or []):
            raise SystemExit(f"error: {path}: columns {reader.fieldnames}; expected "
                             f"path,label,split")
        for line, row in enumerate(reader, start=2):
            label = normalise_class_name(row["label"])
            if label is None or row["split"] not in parts:
                raise SystemExit(f"error: {path}:{line}: label {row['label']!r} / split "
                                 f"{row['split']!r}; expected a class in {CLASSES} and a split "
                                 f"in train/val/test")
            if not os.path.isfile(os.path.join(data_dir, row["path"])):
                raise SystemExit(f"error: {path}:{line}: {row['path']} not found under "
                                 f"{data_dir}; paths in a split CSV are relative to --data")
            parts[row["split"]].append(Sample(row["path"], CLASSES.index(label)))
    return Splits(parts["train"], parts["val"], parts["test"], f"split CSV {path}", [])


def load_splits(data_dir, seed, val_fraction=0.1, split_csv=None):
    """Train/val/test samples for --data DIR (see the module docstring for the layouts).

    Refuses a class without images in train or test: a 4-class head trained on 3 classes, or a
    test set missing a class, gives figures that cannot stand beside the paper's."""
    official = os.path.isdir(data_dir) and official_split_folders(data_dir)
    if split_csv:
        splits = read_split_csv(split_csv, data_dir)
    elif official:
        (train, non_train), (test, non_test) = (find_images(data_dir, f) for f in official)
        splits = Splits(train, [], test, "official", non_train + non_test)
    else:
        samples, non_images = find_images(data_dir)
        train, test = stratified_split(samples, 0.2, seed)
        splits = Splits(train, [], test, f"seeded 80/20 (seed {seed})", non_images)
    for k, part in enumerate(("train", "test")):
        samples = getattr(splits, part)
        for label in sorted(set(range(len(CLASSES))) - {s.label for s in samples}):
            where = split_csv or os.path.join(data_dir, official[k] if official else "",
                                              CLASSES[label])
            raise SystemExit(f"error: {where}: no {CLASSES[label]} image in the {part} split "
                             f"({len(samples)} images in all); every class needs images in "
                             f"train and test: add them there")
    if not split_csv:
        splits.train, splits.val = stratified_split(splits.train, val_fraction, seed)
    if val_fraction > 0 and not splits.val:
        raise SystemExit(f"error: {split_csv or data_dir}: the validation split is empty "
                         f"(--val-fraction {val_fraction} of {len(splits.train)} training "
                         f"images); pass a larger --val-fraction, or 0 for no validation")
    return splits


# ---- decoding and views ------------------------------------------------------------------------

def file_hash(path):
    """SHA-1 of the file's bytes: the image part of every cache key."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def load_rgb(path):
    """Decode any PIL mode (L, RGB, RGBA, P, I;16, I, F, CMYK, ...) to an 8-bit RGB image."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as error:  # PIL raises several types for truncated or non-image files
        raise DecodeError(f"{path}: cannot decode image ({error}); remove it or pass --skip-bad")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit MRI exports: stretch the used range to 0..255 (plain convert("L") clips it)
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(pixels.round().astype(np.uint8))  # mode L
    return image.convert("RGB")


def image_view(image, content_hash, view, image_size):
    """(3, S, S) float tensor in [0, 1]: the image resized to S x S (view 0) or augmented."""
    import torchvision.transforms.v2.functional as TF
    image = image.resize((image_size, image_size), Image.BICUBIC)  # "resize to 224 x 224"
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    if view == 0:
        return pixels.contiguous()
    # the view's generator depends on (content, view) only, never on --seed: cacheable
    digest = hashlib.sha1(f"{content_hash}:{view}".encode()).hexdigest()
    g = torch.Generator().manual_seed(int(digest[:15], 16))
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
    """(grey 'brain' image, lesion box (x0, y0, x1, y1) or None): a grey ellipse on black.

    glioma: large ring-enhancing lesion (bright rim, dark core) inside a hemisphere;
    meningioma: bright, round, well-defined mass at the brain's edge;
    pituitary: small bright blob below the centre; notumor: no lesion."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = size * rng.uniform(0.46, 0.54), size * rng.uniform(0.46, 0.54)
    rx, ry = size * rng.uniform(0.33, 0.40), size * rng.uniform(0.38, 0.44)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.uniform(90, 130)))
    draw.ellipse([cx - rx * 0.35, cy - ry * 0.2, cx + rx * 0.35, cy + ry * 0.2],
                 fill=int(rng.uniform(50, 70)))  # ventricles
    name, lesion = CLASSES[label], None
    if name == "glioma":
        r = size * rng.uniform(0.12, 0.16)
        x = cx + rng.choice([-1, 1]) * rx * rng.uniform(0.35, 0.5)
        y = cy + ry * rng.uniform(-0.4, 0.1)
        lesion = [x - r, y - r * 1.2, x + r, y + r * 1.2]
        draw.ellipse(lesion, fill=int(rng.uniform(200, 240)))
        draw.ellipse([x - r * 0.55, y - r * 0.65, x + r * 0.55, y + r * 0.65], fill=30)
    elif name == "meningioma":
        r = size * rng.uniform(0.08, 0.11)
        angle = rng.uniform(-2.6, -0.5) if rng.uniform() < 0.5 else rng.uniform(0.5, 2.6)
        x, y = cx + (rx - r * 0.6) * math.sin(angle), cy - (ry - r * 0.6) * math.cos(angle)
        lesion = [x - r, y - r, x + r, y + r]
        draw.ellipse(lesion, fill=int(rng.uniform(220, 255)))
    elif name == "pituitary":
        r = size * rng.uniform(0.045, 0.065)
        x, y = cx + rng.uniform(-2, 2), cy + ry * rng.uniform(0.45, 0.6)
        lesion = [x - r, y - r, x + r, y + r]
        draw.ellipse(lesion, fill=int(rng.uniform(220, 255)))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size))
    box = lesion and (max(0, math.floor(lesion[0])), max(0, math.floor(lesion[1])),
                      min(size, math.ceil(lesion[2])), min(size, math.ceil(lesion[3])))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), box


def write_synthetic_dataset(out_dir, per_class=60, seed=0, size=96):
    """Kaggle layout with per_class training and max(per_class // 4, 5) test images per class,
    and out_dir/lesions.csv: path,x0,y0,x1,y1, the box (pixels, x1 and y1 exclusive) holding
    each tumour's lesion. Written into out_dir.partial, then renamed: a killed writer never
    leaves a half dataset (the next writer removes its stale .partial folder)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"error: {out_dir}: folder is not empty; choose a new --out")
    partial = os.path.normpath(out_dir) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    boxes = [("path", "x0", "y0", "x1", "y1")]
    for split, count in (("Training", per_class), ("Testing", max(per_class // 4, 5))):
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(partial, split, name))
            for i in range(count):
                path = f"{split}/{name}/{name}_{i:04d}.jpg"
                image, box = synth_image(label, rng, size)
                image.save(os.path.join(partial, path), quality=95)
                boxes += [(path, *box)] if box else []
    with open(os.path.join(partial, "lesions.csv"), "w", newline="") as f:
        csv.writer(f).writerows(boxes)
    os.replace(partial, out_dir)  # one rename (it replaces an empty out_dir)
    return out_dir


def read_lesion_boxes(csv_path):
    """{image path: (x0, y0, x1, y1)} from a CSV path,x0,y0,x1,y1 as lesions.csv (pixels of the
    image file, x1 and y1 exclusive, paths relative to the dataset folder)."""
    if not os.path.isfile(csv_path):
        raise SystemExit(f"error: {csv_path}: no such file; expected a CSV path,x0,y0,x1,y1")
    boxes = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "x0", "y0", "x1", "y1"} <= set(reader.fieldnames or []):
            raise SystemExit(f"error: {csv_path}: columns {reader.fieldnames}; expected "
                             f"path,x0,y0,x1,y1")
        for line, row in enumerate(reader, start=2):
            box = [row[k].strip() if row[k] else "" for k in ("x0", "y0", "x1", "y1")]
            if not all(v.isdigit() for v in box) or row["path"] in boxes or \
                    not (int(box[0]) < int(box[2]) and int(box[1]) < int(box[3])):
                raise SystemExit(f"error: {csv_path}:{line}: box {box} of {row['path']}; need "
                                 f"whole pixels 0 <= x0 < x1, 0 <= y0 < y1, one row per image")
            boxes[row["path"]] = tuple(int(v) for v in box)
    return boxes


# ---- finding copies: behind audit, split --leak-free, merge and every run's leak check --------
#
# The Kaggle release is not clean: test images come back in training as identical files,
# mirrored or rotated, with other contrast, resized or re-encoded, and as neighbouring slices of
# one patient. Each image is decoded once to a 64 x 64 grey thumbnail (an exact area average, of
# any image size). Its signature is a local contrast normalisation (LCN): minus a Gaussian local
# mean, over the local std; this removes brightness, contrast, gamma and most sharpening and keeps
# where the anatomy's edges are, which tells a copy from a neighbouring slice. The score of (a, b)
# is the largest correlation of b's signature with any of the 8 flips/rotations of a's (the group
# D4). Every pair is scored: no candidate stage that could miss one. Identical decoded pixels are
# `exact` whatever the score. Calibration on the Kaggle copy (contact sheets of narrow score
# bands): in glioma, meningioma and pituitary, neighbouring slices score 0.50-0.87 and copies
# >= 0.92, none in between; in notumor (Br35H: sharpened, contrast-stretched copies) every pair
# looked at from 0.86 up was the same picture.
THUMB_SIZE = 64             # side of the grey thumbnail that signatures are computed on
LCN_SIGMA = 2.0             # pixels (at 64 x 64): scale of the LCN's local mean and std
LCN_FLOOR = 0.3             # floor of the local std, in units of the global std: keeps JPEG
                            # noise in the flat black background from being blown up
COPY_THRESHOLD = 0.90       # score >= this: a copy (some processed notumor copies score less)
SIMILAR_THRESHOLD = 0.50    # score in [0.50, 0.90): alike, probably a neighbouring slice
SIGNATURE_CACHE = "leak_signatures.npz"   # pixel hashes and thumbnails, keyed by file SHA-1
PAIR_COLUMNS = ("a_path", "b_path", "a_label", "b_label", "transform", "score", "kind")
# T with T(a) ~ b, in find_pairs' order: the 4 mirrors of a, then of a.T (flip_lr of a.T is a
# clockwise quarter turn, rot270 as np.rot90(a, 3); flip_ud of a.T is rot90)
D4_NAMES = ("identity", "flip_lr", "flip_ud", "rot180",
            "transpose", "rot270", "rot90", "anti_transpose")


def area_resize(grey, size):
    """(H, W) array -> (size, size) float64, each cell the mean over its exact footprint.

    From running sums, per axis. Unlike PIL's BOX filter, which rounds the footprint for
    non-integer ratios (224 -> 64), it commutes with mirroring: a mirrored copy scores 1."""
    resized = np.asarray(grey, dtype=np.float64)
    for axis in (0, 1):
        n = resized.shape[axis]
        edges = np.arange(size + 1) * (n / size)            # footprint edges, in input cells
        cell = np.minimum(np.floor(edges).astype(int), n - 1)
        fraction = np.expand_dims(edges - cell, 1 - axis)   # broadcast along the other axis
        running = np.cumsum(resized, axis) - resized        # sum of the cells before each cell
        integral = np.take(running, cell, axis) + fraction * np.take(resized, cell, axis)
        resized = np.diff(integral, axis=axis) / (n / size)
    return resized


def load_signatures(data_dir, paths, cache_dir=None):
    """(pixel hashes, (N, 64, 64) uint8 thumbnails) of data_dir/<path> for each path.

    Cached in cache_dir/leak_signatures.npz by file SHA-1 (a renamed file still hits, an edited
    one misses); only new files are decoded, then the cache is rewritten to a temporary file and
    renamed. An undecodable file matches nothing: zero thumbnail, hash "undecodable:<SHA-1>"."""
    keys = [file_hash(os.path.join(data_dir, p)) for p in paths]
    cache_file = os.path.join(cache_dir or "", SIGNATURE_CACHE)
    cached = {}  # file SHA-1 -> (pixel hash, thumbnail)
    if cache_dir and os.path.exists(cache_file):
        try:  # the zip's CRC-32s catch flipped bytes, strict=True arrays of unequal length
            with np.load(cache_file) as stored:
                cached = dict(zip(stored["keys"].tolist(),
                                  zip(stored["hashes"].tolist(), stored["thumbs"]), strict=True))
        except Exception as error:
            print(f"{cache_file}: damaged ({type(error).__name__}: {error}); rebuilding it")
    missing = {key: path for key, path in zip(keys, paths) if key not in cached}
    if missing:
        print(f"leak check: decoding {len(missing)} images once, for their signatures")
    for key, path in missing.items():
        try:
            image = load_rgb(os.path.join(data_dir, path))
        except DecodeError as error:
            print(f"leak check: skipped {error}")
            cached[key] = (f"undecodable:{key}", np.zeros((THUMB_SIZE, THUMB_SIZE), np.uint8))
            continue
        pixels = np.asarray(image)
        pixel_hash = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        thumb = area_resize(np.asarray(image.convert("L")), THUMB_SIZE)
        cached[key] = (pixel_hash, thumb.round().clip(0, 255).astype(np.uint8))
    if cache_dir and missing:
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{cache_file}.{os.getpid()}.tmp.npz"
        hashes, thumbs = zip(*cached.values())
        np.savez(temporary, keys=list(cached), hashes=hashes, thumbs=np.stack(thumbs))
        os.replace(temporary, cache_file)
    thumbs = np.array([cached[key][1] for key in keys], np.uint8)
    return [cached[key][0] for key in keys], thumbs.reshape(-1, THUMB_SIZE, THUMB_SIZE)


def lcn_signatures(thumbnails):
    """(N, S, S) uint8 -> (N, S, S) float32 LCN signatures, each of zero mean and norm 1.

    Unchanged by b -> alpha * b + beta (alpha > 0): the global std is divided out first. A flat
    image gets the zero signature and so scores 0 against everything."""
    x = torch.from_numpy(np.asarray(thumbnails, dtype=np.float32))
    size, radius = x.shape[-1], int(math.ceil(3 * LCN_SIGMA))
    # Gaussian blur as an (S, S) matrix with the replicated edges folded in: symmetric, so it
    # commutes with D4, and two small matrix products are far faster than a CPU convolution
    blur, rows = torch.zeros(size, size), torch.arange(size)
    for offset in range(-radius, radius + 1):
        blur[rows, (rows + offset).clamp(0, size - 1)] += math.exp(-offset**2 / 2 / LCN_SIGMA**2)
    blur = blur / blur.sum(1, keepdim=True)
    x = x / x.flatten(1).std(1).clamp_min(1e-3)[:, None, None]   # global contrast -> 1
    centred = x - blur @ x @ blur.T                               # minus the local mean
    lcn = centred / (blur @ centred ** 2 @ blur.T).sqrt().clamp_min(LCN_FLOOR)
    lcn = lcn - lcn.mean((1, 2), keepdim=True)
    return lcn / lcn.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]


def mirror_parts(signatures):
    """(N, S, S) -> (4, N, S*S/4): the parts even/odd under left-right and up-down mirroring.

    A signature is the sum of 4 parts that each mirror keeps or negates, so <mirror(a), b> is a
    signed sum of the 4 part products (MIRROR_SIGNS). A part is fixed by its top-left quadrant
    (scaled by 2, quadrant products equal full ones): the 4 mirrors cost one full product."""
    lr, ud, both = signatures.flip(-1), signatures.flip(-2), signatures.flip(-1, -2)
    half = signatures.shape[-1] // 2
    parts = (signatures + lr + ud + both, signatures - lr + ud - both,
             signatures + lr - ud - both, signatures - lr - ud + both)
    return torch.stack([p[:, :half, :half].flatten(1) / 2 for p in parts])


# row: the sign of each part in <T(a), b> for T = identity, flip_lr, flip_ud, rot180
MIRROR_SIGNS = torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])


def find_pairs(hashes, signatures_a, signatures_b=None, threshold=COPY_THRESHOLD, rows=256):
    """{(i, j): (kind, transform, score)} of the pairs with score = max over T in D4 of
    <T(a_i), b_j> >= threshold (without b: pairs i < j within a), and of identical decoded
    pixels (hashes: those of a, then of b). kind: exact, transformed, similar (< COPY_THRESHOLD);
    transform: a name in D4_NAMES. 8 transforms for the price of 2 products (mirror_parts)."""
    within, n_a = signatures_b is None, len(signatures_a)
    b_parts = mirror_parts(signatures_a if within else signatures_b)   # (4, M, S*S/4)
    found = {}
    for start in range(0, n_a, rows):
        a = signatures_a[start:start + rows]                             # (c, S, S)
        first = start if within else 0  # within one set only j >= start can have j > i
        scores = torch.cat([torch.einsum("tp,pcm->tcm", MIRROR_SIGNS, parts @ b_parts[:, first:]
                                         .transpose(1, 2))  # (4, c, M - first) per mirror set
                            for parts in (mirror_parts(a), mirror_parts(a.transpose(1, 2)))])
        best, transform = scores.max(0)
        keep = best >= threshold
        if within:  # only j > i: not the diagonal, nor a pair counted from the other side
            keep &= torch.arange(first, n_a) > torch.arange(start, start + len(a))[:, None]
        for i, j in keep.nonzero().tolist():
            score = math.floor(best[i, j].item() * 1e4) / 1e4  # rounded down: keeps its kind
            found[start + i, first + j] = ("transformed" if score >= COPY_THRESHOLD else
                                           "similar", D4_NAMES[transform[i, j]], score)
    groups = {}  # identical decoded pixels are exact, even where the score is not (flat images)
    for index, digest in enumerate(hashes):
        groups.setdefault(digest, []).append(index)
    for i, j in (pair for group in groups.values() for pair in itertools.combinations(group, 2)):
        if within or i < n_a <= j:  # i < j; across a and b: i in a, j in b
            found[i, j - (0 if within else n_a)] = ("exact", "identity", 1.0)
    return found


def test_paths_with_train_copy(data_dir, train_paths, test_paths, cache_dir=None):
    """The test paths (same strings as given) with an exact or transformed copy in train_paths.

    Any split: the test signatures are compared with the training ones directly. Signatures are
    cached in cache_dir (shared with `data.py audit --cache`): later calls only hash the files
    and compare. Accuracy on the other test paths is the leak-free figure."""
    train_paths, test_paths = list(train_paths), list(test_paths)
    if not train_paths or not test_paths:
        return set()
    hashes, thumbnails = load_signatures(data_dir, train_paths + test_paths, cache_dir)
    signatures = lcn_signatures(thumbnails)
    pairs = find_pairs(hashes, signatures[:len(train_paths)], signatures[len(train_paths):])
    return {test_paths[j] for _, j in pairs}


# ---- audit, leak-free split --------------------------------------------------------------------

def audit_images(data_dir):
    """[(path, class name, split folder or "")] of every image under --data DIR."""
    parts = official_split_folders(data_dir) if os.path.isdir(data_dir) else None
    return [(s.path, CLASSES[s.label], part) for part in parts or [""]
            for s in find_images(data_dir, part)[0]]


def audit_pairs(data_dir, images, cache_dir=None):
    """Rows (dicts with PAIR_COLUMNS) for every exact, transformed or similar pair of images."""
    hashes, thumbnails = load_signatures(data_dir, [p for p, _, _ in images], cache_dir)
    pairs = find_pairs(hashes, lcn_signatures(thumbnails), threshold=SIMILAR_THRESHOLD)
    return [{"a_path": images[i][0], "b_path": images[j][0], "a_label": images[i][1],
             "b_label": images[j][1], "transform": transform, "score": score, "kind": kind}
            for (i, j), (kind, transform, score) in sorted(pairs.items())]


def run_audit(data_dir, out_dir, cache_dir=None):
    """`data.py audit`: out_dir/pairs.csv (every pair) and summary.json (the official test
    images with a copy in training, per class); returns the summary."""
    import json
    images = audit_images(data_dir)
    cache_dir = cache_dir or out_dir
    rows = audit_pairs(data_dir, images, cache_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pairs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PAIR_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    parts = [part for _, _, part in images]
    summary = {"data": os.path.abspath(data_dir),
               "images": {part or "all": parts.count(part) for part in sorted(set(parts))}}
    official = official_split_folders(data_dir)
    if official:  # the same function every run's leak check calls
        test = [(path, label) for path, label, part in images if part == official[1]]
        copied = test_paths_with_train_copy(data_dir, [p for p, _, part in images if part ==
                                                       official[0]], [p for p, _ in test], cache_dir)
        summary["test_with_train_copy"] = {name: {
            "test_images": sum(name in ("all", label) for _, label in test),
            "with_copy": sum(name in ("all", label) and path in copied for path, label in test)}
            for name in ("all",) + CLASSES}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    kinds = [row["kind"] for row in rows]
    print(f"{len(images)} images {summary['images']}: {kinds.count('exact')} exact, "
          f"{kinds.count('transformed')} transformed, {kinds.count('similar')} similar pairs; "
          f"wrote {out_dir}/pairs.csv, summary.json")
    for name, counts in summary.get("test_with_train_copy", {}).items():
        print(f"  {name:10s} test images with a copy in training: {counts['with_copy']:4d} "
              f"of {counts['test_images']:4d}")
    return summary


def assign_groups_to_parts(group_labels, group_sizes, fractions, seed):
    """Part index (0..len(fractions)-1) of each group, stratified by group label.

    Within each label the groups are visited in seeded random order; each goes to the part
    furthest below its target (fraction x images of that label). Whole groups move, so a part
    can overshoot its target by at most one group."""
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


def make_split(data_dir, seed, leak_free=True, strict=False, cache_dir=None):
    """(rows (path, label, train/val/test), group of each image): a stratified 80/10/10 split.

    leak_free: images linked by exact or transformed pairs (strict: similar ones too) form one
    group (connected components), and whole groups go to one part, by their majority label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    images = audit_images(data_dir)
    index = {path: k for k, (path, _, _) in enumerate(images)}
    links = [(index[r["a_path"]], index[r["b_path"]]) for r in (audit_pairs(
        data_dir, images, cache_dir) if leak_free else []) if strict or r["kind"] != "similar"]
    i, j = np.array(links, dtype=np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(images), len(images)))
    group_of = connected_components(graph, directed=False)[1]
    counts = np.zeros((group_of.max() + 1, len(CLASSES)), int)  # (groups, classes)
    np.add.at(counts, (group_of, [CLASSES.index(label) for _, label, _ in images]), 1)
    # majority label of each group, ties to the first class in CLASSES order
    part_of_group = assign_groups_to_parts(counts.argmax(1).tolist(), counts.sum(1).tolist(),
                                           (0.8, 0.1, 0.1), seed)
    return [(path, label, ("train", "val", "test")[part_of_group[group_of[k]]])
            for k, (path, label, _) in enumerate(images)], group_of


# ---- merging datasets --------------------------------------------------------------------------

def merge_datasets(sources, out_dir):
    """`data.py merge`: copy the images of several sources into out_dir, one per group of copies.

    An image with an exact or transformed copy (the audit's matcher: any size, mirrored, rotated,
    re-encoded, other contrast) in an earlier source is not copied: the first source given wins.
    Copies within one source stay (a leak-free split keeps them together). Layout: Training/ and
    Testing/ when every source has them, else <class>/. Writes out_dir/manifest.csv: dest_path,
    source_path, source_dataset, label, status (copied, dropped, dropped (label conflict),
    skipped: why), copy_of (the kept file a dropped one copies), how (exact, resized/re-encoded,
    or the D4 transform, e.g. flip_lr). Returns the manifest rows."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SystemExit(f"error: {out_dir}: exists and is not an empty folder; choose a new --out")
    items, names, keep_split = [], [], True  # items: (source name, file, label, part, skip reason)
    for source in sources:
        if not os.path.isdir(source):
            raise SystemExit(f"error: {source}: no such folder; each merge source is a dataset "
                             f"folder")
        official = official_split_folders(source)
        keep_split &= official is not None
        name = os.path.basename(os.path.normpath(source))
        names.append(name if name not in names else f"{name}_{len(names) + 1}")
        for part, folder in zip(("Training", "Testing"), official) if official else [("", "")]:
            for class_folder, images, _ in class_folder_files(os.path.join(source, folder),
                                                              UNLABELLED_FOLDERS):
                label = normalise_class_name(class_folder)
                reason = UNLABELLED_FOLDERS.get(class_folder.lower(), "")
                items += [(names[-1], path, label, part, reason) for path in images]
    labelled = [k for k, item in enumerate(items) if item[2]]
    hashes, thumbnails = load_signatures("", [items[k][1] for k in labelled])
    hash_of = dict(zip(labelled, hashes))
    best = {}  # item -> (rank, -original, how) of its best copy in an earlier source
    for (i, j), (kind, transform, score) in find_pairs(hashes, lcn_signatures(thumbnails)).items():
        i, j = labelled[i], labelled[j]  # i < j: i is from the same or an earlier source
        if items[i][0] != items[j][0] and not hash_of[i].startswith("undecodable"):
            how = "exact" if kind == "exact" else transform.replace("identity", "resized/re-encoded")
            best[j] = max(best.get(j, (-1,)), (2 if kind == "exact" else score, -i, how))
    manifest, kept = [], {}  # kept: item -> its path in out_dir, or that of the copy kept
    for k, (name, path, label, part, reason) in enumerate(items):
        row = {"dest_path": "", "source_path": path, "source_dataset": name, "label": label or "",
               "status": f"skipped: {reason}", "copy_of": "", "how": ""}
        if hash_of.get(k, "").startswith("undecodable"):
            row["status"] = "skipped: cannot decode image"
        elif k in best:
            original = -best[k][1]
            kept[k] = kept[original]
            conflict = " (label conflict)" if items[original][2] != label else ""
            row.update(status=f"dropped{conflict}", copy_of=kept[k], how=best[k][2])
        elif label:
            folder = f"{part}/{label}" if keep_split else label
            dest = f"{folder}/{os.path.basename(path)}"
            while os.path.exists(os.path.join(out_dir, dest)):  # name taken: prefix the source
                dest = f"{folder}/{name}_{os.path.basename(dest)}"
            os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
            shutil.copyfile(path, os.path.join(out_dir, dest))
            kept[k] = dest
            row.update(dest_path=dest, status="copied")
        manifest.append(row)
    if not keep_split and any(item[3] for item in items):
        print(f"merge: not every source has Training/ and Testing/, so the official split is "
              f"dropped: wrote {out_dir}/<class>/ (make a split with `data.py split`)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(manifest[0]) if manifest else ["dest_path"])
        writer.writeheader()
        writer.writerows(manifest)
    return manifest


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a small synthetic MRI-like dataset")
    synth.add_argument("--out", required=True, help="new folder to write (Kaggle layout)")
    synth.add_argument("--per-class", type=int, default=60,
                       help="training images per class (test gets a quarter, at least 5)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    audit = commands.add_parser("audit", help="find copies of images within and across splits")
    audit.add_argument("--data", required=True, help="dataset folder (Kaggle or class folders)")
    audit.add_argument("--out", required=True, help="folder for pairs.csv and summary.json")
    audit.add_argument("--cache", help="folder for the image signatures (default: --out); a "
                                       "run's --cache-dir lets its leak check reuse them")
    split = commands.add_parser("split", help="write a stratified 80/10/10 split CSV for --split")
    split.add_argument("--data", required=True, help="dataset folder (all its images are split)")
    split.add_argument("--out", required=True, help="CSV to write, columns path,label,split")
    split.add_argument("--leak-free", action="store_true",
                       help="keep each group of exact/transformed copies in one part")
    split.add_argument("--strict", action="store_true", help="with --leak-free: group similar "
                       "images (probably neighbouring slices of one patient) too")
    split.add_argument("--seed", type=int, default=42, help="seed of the split")
    split.add_argument("--cache", help="folder for the image signatures, reused by later calls")
    merge = commands.add_parser("merge", help="merge datasets, one image per group of copies")
    merge.add_argument("sources", nargs="+", metavar="SRC", help="dataset folders, first wins: "
                       "Kaggle layout, class folders, Br35H (no/ yes/)")
    merge.add_argument("--out", required=True, help="new or empty folder to write")
    args = parser.parse_args(argv)
    if args.command == "synth":
        write_synthetic_dataset(args.out, args.per_class, args.seed)
        print(f"wrote {args.out}: Training/ and Testing/ with {', '.join(CLASSES)}, lesions.csv")
    elif args.command == "audit":
        run_audit(args.data, args.out, args.cache)
    elif args.command == "split":
        if args.strict and not args.leak_free:
            raise SystemExit("error: --strict groups similar images for --leak-free; pass "
                             "--leak-free too")
        rows, group_of = make_split(args.data, args.seed, args.leak_free, args.strict, args.cache)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split")] + rows)
        print(f"wrote {args.out}: {len(rows)} images in {len(set(group_of))} groups, "
              f"{'leak-free' if args.leak_free else 'plain'} split (seed {args.seed})")
    elif args.command == "merge":
        status = [row["status"] for row in merge_datasets(args.sources, args.out)]
        print(f"wrote {args.out}: {status.count('copied')} images copied, "
              f"{sum(s.startswith('dropped') for s in status)} copies of an earlier source's "
              f"image dropped ({status.count('dropped (label conflict)')} filed under another "
              f"class), {sum(s.startswith('skipped') for s in status)} skipped; see "
              f"{args.out}/manifest.csv")


if __name__ == "__main__":
    main()
