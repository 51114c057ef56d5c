"""Data for tumor-vlm: find the images, split them, decode them, make and cache views, find copies.

    python data.py synth --out ./synth --per-class 60      # MRI-like images, lesions/captions.csv
    python data.py audit --data DIR --out OUT              # test images that copy training ones
    python data.py split --data DIR --out split.csv --leak-free   # copies kept in one part
    python data.py merge SRC... --out ./merged             # several datasets, one copy per image

--data DIR: Kaggle's DIR/Training/<class>/ + DIR/Testing/<class>/ (the official split), class
folders DIR/<class>/ (seeded stratified 80/20, as the paper says) or --split CSV (path,label,split);
validation: a seeded stratified 10% of training. On Kaggle's 7,019 images, 994 of the 1,311
official test images have an exact or transformed copy in Training (all 405 notumor); 317 leak-free.
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import stats

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CLASS_ALIASES = {alias: name for name, aliases in (  # lower case, spaces/hyphens as "_" -> class
    ("glioma", "glioma_tumor gliomas"), ("meningioma", "meningioma_tumor meningiomas"),
    ("notumor", "no_tumor no normal healthy no_tumour notumour"),
    ("pituitary", "pituitary_tumor pituitary_tumour")) for alias in [name, *aliases.split()]}
UNLABELLED_FOLDERS = {"yes": "Br35H yes/: tumour of unknown type", "pred": "Br35H pred/: no label"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
SPLIT_FOLDERS = {"training": "train", "train": "train", "testing": "test", "test": "test"}
CAPTION_NOUNS = {"glioma": "glioma", "meningioma": "meningioma", "pituitary": "pituitary tumor"}
PROGRESS = sys.stderr.isatty()  # progress bars on a terminal only; a log gets a line per phase

# Augmentation of views 1..K-1 (paper: Data Preprocessing); AUGMENTATION_ID is in the cache key.
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


# ---- finding and splitting images --------------------------------------------------------------

def normalise_class_name(name):
    """'No Tumor', 'no_tumor', 'glioma_tumor', ... -> a name in CLASSES, or None if unknown."""
    return CLASS_ALIASES.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def official_split_folders(root):
    """(Training folder, Testing folder) as named on disk when root has both, else None."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root}: no such folder; pass the dataset's folder")
    found = {SPLIT_FOLDERS[f.lower()]: f for f in os.listdir(root)
             if f.lower() in SPLIT_FOLDERS and os.path.isdir(os.path.join(root, f))}
    return (found["train"], found["test"]) if len(found) == 2 else None


def files_under(folder, tree=None):
    """Every file under folder at any depth, sorted, hidden ones skipped. A folder link into tree
    (default: folder; images read twice) or above itself (a loop) is refused, others followed."""
    found, root = [], os.path.realpath(tree or folder)
    within = lambda path, top: os.path.commonpath([path, top]) == top
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for link in [os.path.join(parent, name) for name in folders]:
            target = os.path.realpath(link)
            if os.path.islink(link) and (within(target, root) or
                                         within(os.path.realpath(parent), target)):
                raise SystemExit(f"error: {link}: a link to {target}, inside the dataset or above "
                                 f"the link (images read twice, or forever); remove the link")
        found += [os.path.join(parent, name) for name in files if not name.startswith(".")]
    return sorted(filter(os.path.isfile, found))


def is_image(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def find_images(data_dir, also_allowed=()):
    """([(path, class, split folder or "")] by split, then path; [other files' paths]) under the
    class folders (also_allowed ones: class = folder name) of Training/ + Testing/, or data_dir."""
    images, others = [], []
    for part in official_split_folders(data_dir) or [""]:
        root = os.path.join(data_dir, part)
        folders = sorted(f for f in os.listdir(root) if os.path.isdir(os.path.join(root, f))
                         and not f.startswith(".") and f != "__MACOSX")
        if not folders or any(not normalise_class_name(f) and f.lower() not in also_allowed
                              for f in folders):
            listing = ", ".join(f + "/" for f in folders) or "nothing"
            raise SystemExit(f"error: {root}: found {listing}; need class folders "
                             f"{'/ '.join(CLASSES)}/ (or no_tumor/, no/, ...), or Training/ and "
                             f"Testing/ holding them")
        found = sorted((os.path.relpath(path, data_dir).replace(os.sep, "/"),
                        normalise_class_name(folder) or folder.lower(), part) for folder in folders
                       for path in files_under(os.path.join(root, folder), data_dir))
        images += [image for image in found if is_image(image[0])]
        others += [path for path, _, _ in found if not is_image(path)]
    return images, others


def stratified_split(samples, fraction, seed, count=None):
    """(rest, part): round(fraction * n_c) of each class c (or count of each), seeded, in part."""
    rng, rest, part = np.random.default_rng(seed), [], []
    for label in range(len(CLASSES)):
        members = [s for s in samples if s.label == label]
        shuffled = [members[i] for i in rng.permutation(len(members))]
        n_part = count if fraction is None else int(round(fraction * len(members)))
        part, rest = part + shuffled[:n_part], rest + shuffled[n_part:]
    return sorted(rest, key=lambda s: s.path), sorted(part, key=lambda s: s.path)


def read_split_csv(split_csv, data_dir):
    """Splits of a CSV with columns path,label,split (paths relative to data_dir)."""
    parts, listed = {"train": [], "val": [], "test": []}, set()
    with open(split_csv, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) is dropped
        reader = csv.DictReader(f)
        if not {"path", "label", "split"} <= set(reader.fieldnames or []):
            raise SystemExit(f"error: {split_csv}: has {reader.fieldnames}; need path,label,split")
        for line, row in enumerate(reader, start=2):
            label = normalise_class_name(row["label"])
            where = f"error: {split_csv}:{line}: {row['path']}"
            if label is None or row["split"] not in parts:
                raise SystemExit(f"{where}: label {row['label']!r}, split {row['split']!r}; need "
                                 f"a class {CLASSES}, train/val/test")
            if not os.path.isfile(os.path.join(data_dir, row["path"])):
                raise SystemExit(f"{where} not found in {data_dir}; paths are relative to --data")
            if row["path"] in listed:
                raise SystemExit(f"{where} is listed twice; each image belongs to one part")
            listed.add(row["path"])
            parts[row["split"]].append(Sample(row["path"], CLASSES.index(label)))
    return Splits(parts["train"], parts["val"], parts["test"], f"split CSV {split_csv}", [])


def write_csv(path, rows):
    """rows (the header first) to the CSV file path, written atomically (its folder made)."""
    stats.atomic_write(path, lambda f: csv.writer(f).writerows(rows), "w")


def load_splits(data_dir, seed, val_fraction=0.1, split_csv=None):
    """Train/val/test samples of --data DIR; a class without train or test images is refused."""
    official = official_split_folders(data_dir)
    if split_csv:
        splits = read_split_csv(split_csv, data_dir)
    else:
        images, non_images = find_images(data_dir)
        samples = [Sample(path, CLASSES.index(label)) for path, label, _ in images]
        train, test = ([s for s, image in zip(samples, images) if image[2] == part]
                       for part in official) if official else stratified_split(samples, 0.2, seed)
        source = "official" if official else f"seeded 80/20 (seed {seed})"
        splits = Splits(train, [], test, source, non_images)
    for k, (part, samples) in enumerate((("train", splits.train), ("test", splits.test))):
        missing = [name for name in CLASSES if all(CLASSES[s.label] != name for s in samples)]
        if missing:  # name the folder the class's images should be in
            where = split_csv or os.path.join(data_dir, official[k] if official else "", missing[0])
            raise SystemExit(f"error: {where}: no {missing[0]} image in the {part} split "
                             f"({len(samples)} images in all); every class needs some: add them")
    if not split_csv:
        splits.train, splits.val = stratified_split(splits.train, val_fraction, seed)
    if val_fraction > 0 and not splits.val:
        fix = "add val rows to the CSV" if split_csv else "raise --val-fraction"
        raise SystemExit(f"error: {split_csv or data_dir}: empty validation split (--val-fraction "
                         f"{val_fraction}, {len(splits.train)} training images); {fix}, or pass "
                         f"--select-on test to train without a validation split")
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit: convert("L") would clip
        pixels = np.asarray(image, dtype=np.float64)  # so stretch the used range to 0..255
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
    digest = hashlib.sha1(f"{content_hash}:{view}".encode()).hexdigest()  # not --seed: cacheable
    g = torch.Generator().manual_seed(int(digest[:15], 16))  # depends on (content, view) only
    uniform = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()
    flips = [dim for dim in (-1, -2) if torch.rand((), generator=g) < 0.5]  # each with p = 1/2
    pixels = pixels.flip(flips)  # a horizontal and/or a vertical flip
    pixels = TF.affine(pixels, angle=uniform(-ROTATION_DEGREES, ROTATION_DEGREES), translate=[0, 0],
                       scale=uniform(*ZOOM_RANGE), shear=[0.0, 0.0],
                       interpolation=TF.InterpolationMode.BILINEAR)
    pixels = TF.adjust_brightness(pixels, uniform(*BRIGHTNESS_RANGE))
    pixels = TF.adjust_contrast(pixels, uniform(*CONTRAST_RANGE))
    return (pixels + torch.randn(pixels.shape, generator=g) * math.sqrt(NOISE_VARIANCE)).clamp(0, 1)


# ---- the feature cache: the frozen stem's outputs on disk --------------------------------------

class FeatureCache:
    """Stem outputs: a checksummed file per (image content, view), under a hash of the key below."""

    def __init__(self, root, model):
        key = dict(model.cache_key, augmentation=AUGMENTATION_ID, torch=torch.__version__)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.dir, self.damaged = os.path.join(root, digest[:16]), 0  # damaged: entries recomputed
        if not os.path.isfile(os.path.join(self.dir, "key.json")):  # a full cache: read-only is ok
            stats.write_json(key, os.path.join(self.dir, "key.json"))  # what the folder holds

    def path(self, content_hash, view):
        return os.path.join(self.dir, content_hash[:2], f"{content_hash}_v{view}.bin")

    def read(self, path):
        """The stored tensor (float32), or None when missing or damaged (checksum mismatch)."""
        stored = stats.read_checked(path)
        self.damaged += stored is None and os.path.exists(path)  # recomputed by the caller
        return None if stored is None else torch.from_numpy(np.load(io.BytesIO(stored))).float()

    def put(self, content_hash, view, features):
        buffer = io.BytesIO()
        np.save(buffer, features.numpy().astype(np.float16))
        stats.write_checked(self.path(content_hash, view), buffer.getvalue())


class Inputs:
    """Batches of one split: cached stem features (default) or decoded pixels (--no-cache)."""

    def __init__(self, samples, hashes, data_dir, model, cache, make_view=None):
        self.samples, self.hashes, self.data_dir = samples, hashes, data_dir
        self.model, self.cache, self.make_view = model, cache, make_view or image_view
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)

    def __len__(self):
        return len(self.samples)

    def pixels(self, index, view):
        sample = self.samples[index]
        image = load_rgb(os.path.join(self.data_dir, sample.path))
        return self.make_view(image, self.hashes[sample.path], view, self.model.image_size)

    def features(self, index, view):
        key = (self.hashes[self.samples[index].path], view)
        feature = self.cache.read(self.cache.path(*key))
        if feature is None:  # damaged or deleted since the build: recompute and store
            store_stem(self.model, self.cache, [self.pixels(index, view)], [key])
            feature = self.cache.read(self.cache.path(*key))
        return feature

    def batch(self, indices, views):
        load = self.pixels if self.cache is None else self.features
        return torch.stack([load(i, v) for i, v in zip(indices, views)])

    def logits(self, inputs):
        return self.model.top(inputs) if self.cache is not None else self.model(inputs)


def store_stem(model, cache, pixels, keys):
    """Run the frozen stem on a list of views (3, S, S) and store each under its (hash, view)."""
    with torch.no_grad():
        features = model.stem(torch.stack(pixels).to(model.mean.device)).float().cpu()
    for (content_hash, view), feature in zip(keys, features):
        cache.put(content_hash, view, feature)


def few_shot(samples, shots, seed, split):
    """`shots` samples of each class, drawn with the seed, in path order (the K-shot protocol)."""
    fewest = min(sum(s.label == c for s in samples) for c in range(len(CLASSES)))
    if fewest < shots:
        raise SystemExit(f"error: --shots {shots}: a class has {fewest} {split} images; pass fewer")
    return stratified_split(samples, None, seed, shots)[1]


def build_cache(model, cache, jobs, data_dir, batch_size, skip_bad, make_view=image_view):
    """Store the stem's outputs for the views of jobs {path: (content hash, view ids)} the cache
    lacks; return the undecodable paths (skip_bad, else the first stops the run; all it does with
    no cache). Under torchrun a rank takes every N-th batch, whole: the bytes one process writes."""
    todo = [(path, h, v) for path, (h, views) in jobs.items() for v in views
            if cache is None or not os.path.exists(cache.path(h, v))]
    batches = range(0, len(todo), batch_size)
    if dist.is_initialized():  # once every rank has listed todo
        dist.barrier()
        batches = batches[dist.get_rank()::dist.get_world_size()]
    bad, started = [], time.time()
    model.eval()
    for start in tqdm(batches, desc="feature cache", unit="batch", disable=not (PROGRESS and todo)):
        batch, images = todo[start:start + batch_size], {}
        for path in dict.fromkeys(path for path, _, _ in batch):
            try:
                images[path] = load_rgb(os.path.join(data_dir, path))
            except DecodeError as error:
                if not skip_bad:
                    raise SystemExit(f"error: {error}")
                bad.append(path)
        views = [(make_view(images[path], h, v, model.image_size), (h, v))
                 for path, h, v in batch if path in images and cache is not None]
        if views:
            store_stem(model, cache, *zip(*views))
    if dist.is_initialized():  # every rank's undecodable images
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = sum(everyone, [])
    bad = [path for path in dict.fromkeys(p for p, _, _ in todo) if path in bad]  # in todo order
    if todo and cache is not None:
        print(f"feature cache: {len(todo)} views in {time.time() - started:.0f} s ({cache.dir})")
    return bad


# ---- synthetic MRI-like data -------------------------------------------------------------------

def synth_image(label, rng, size=96):
    """(grey MRI-like image of the class, its lesion's box (x0, y0, x1, y1), None for notumor)."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    # one head shape +-1 % (random features would see a varying bright outline), told apart by
    # noise (no copies); T1 scalp fat is brightest: random weights attend to it (test_explain.py)
    cx, cy = size * rng.uniform(0.49, 0.51), size * rng.uniform(0.49, 0.51)
    rx, ry = size * rng.uniform(0.36, 0.37), size * rng.uniform(0.41, 0.42)
    for grow, grey in ((size * 7 / 96, (230, 250)), (size * 2 / 96, (15, 35)), (0, (90, 130))):
        draw.ellipse([cx - rx - grow, cy - ry - grow, cx + rx + grow, cy + ry + grow],
                     fill=int(rng.uniform(*grey)))  # scalp, its dark inner edge, the brain
    draw.ellipse([cx - rx * 0.35, cy - ry * 0.2, cx + rx * 0.35, cy + ry * 0.2],
                 fill=int(rng.uniform(50, 70)))  # ventricles
    name, box = CLASSES[label], None
    if name == "glioma":  # large, ring-enhancing (a dark centre), in one hemisphere
        r, tall = size * rng.uniform(0.12, 0.16), 1.2
        x = cx + rng.choice([-1, 1]) * rx * rng.uniform(0.35, 0.5)
        y = cy + ry * rng.uniform(-0.4, 0.1)
    elif name == "meningioma":  # a round mass at the edge
        r, tall = size * rng.uniform(0.08, 0.11), 1
        angle = rng.uniform(-2.6, -0.5) if rng.uniform() < 0.5 else rng.uniform(0.5, 2.6)
        x, y = cx + (rx - r * 0.6) * math.sin(angle), cy - (ry - r * 0.6) * math.cos(angle)
    elif name == "pituitary":  # a small blob below the centre
        r, tall = size * rng.uniform(0.045, 0.065), 1
        x, y = cx + rng.uniform(-2, 2), cy + ry * rng.uniform(0.45, 0.6)
    if name != "notumor":  # brighter than the brain, darker than the scalp; box: whole pixels
        draw.ellipse([x - r, y - r * tall, x + r, y + r * tall], fill=int(rng.uniform(190, 230)))
        box = (max(0, math.floor(x - r)), max(0, math.floor(y - r * tall)),
               min(size, math.ceil(x + r)), min(size, math.ceil(y + r * tall)))
    if name == "glioma":
        draw.ellipse([x - r * 0.55, y - r * 0.65, x + r * 0.55, y + r * 0.65], fill=30)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (size, size))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), box


def synth_caption(name, box=None, size=96):
    """The generator's caption: class, lesion size (box width / image width) and place (left/right
    as seen, not the patient's sides); without a box, the class template. Lower case, no commas."""
    if name == "notumor":
        return "axial mri slice with no tumor"
    noun = CAPTION_NOUNS[name]
    if box is None:
        return f"axial mri slice with a {noun}"
    width, (x, y) = (box[2] - box[0]) / size, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    extent = "small" if width < 0.15 else "medium" if width < 0.24 else "large"
    vertical = "upper" if y < size * 0.42 else "lower" if y > size * 0.58 else ""
    horizontal = "left" if x < size * 0.42 else "right" if x > size * 0.58 else "middle"
    where = f"in the {vertical} {horizontal}" if vertical else f"on the {horizontal}"
    return f"axial mri slice with a {extent} {noun} {where}"


def write_synthetic_dataset(out_dir, per_class=60, seed=0, size=96):
    """Kaggle layout (per_class training, max(per_class // 4, 5) test images a class), lesions.csv
    (path,x0,y0,x1,y1; x1, y1 exclusive), captions.csv; built in out_dir.partial<pid>, renamed."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"error: {out_dir}: folder is not empty; choose a new --out")
    partial = f"{os.path.normpath(out_dir)}.partial{os.getpid()}"  # one per writer
    shutil.rmtree(partial, ignore_errors=True)  # ours, from an interrupted call
    rng = np.random.default_rng(seed)
    boxes, captions = [("path", "x0", "y0", "x1", "y1")], [("path", "caption")]
    for split, count in (("Training", per_class), ("Testing", max(per_class // 4, 5))):
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(partial, split, name))
            for i in range(count):
                path = f"{split}/{name}/{name}_{i:04d}.jpg"
                image, box = synth_image(label, rng, size)
                image.save(os.path.join(partial, path), quality=95)
                if box:
                    boxes.append((path, *box))
                captions.append((path, synth_caption(name, box, size)))  # draws no random number
    write_csv(os.path.join(partial, "lesions.csv"), boxes)
    write_csv(os.path.join(partial, "captions.csv"), captions)
    try:
        os.replace(partial, out_dir)  # one rename (it replaces an empty out_dir)
    except OSError:  # out_dir filled meanwhile: by another writer if it holds lesions.csv
        shutil.rmtree(partial)
        if not os.path.isfile(os.path.join(out_dir, "lesions.csv")):
            raise SystemExit(f"error: {out_dir}: folder is not empty; choose a new --out")
    return out_dir


# ---- finding copies: for audit, split --leak-free, merge, and every run's leak check ----------
# Signature: a 64 x 64 grey thumbnail (exact area average) after local contrast normalisation
# (LCN: minus a Gaussian local mean, over the local std), which removes brightness, contrast, gamma
# and most sharpening and keeps the edges that tell a copy from a neighbouring slice. Score: the
# best correlation of b with the 8 flips/rotations (D4) of a. On Kaggle's contact sheets, adjacent
# slices score 0.50-0.87, copies >= 0.92; notumor's (sharpened, contrast-stretched) 0.86 and up.
THUMB_SIZE = 64             # side of the grey thumbnail that signatures are computed on
LCN_SIGMA = 2.0             # pixels (at 64 x 64): scale of the LCN's local mean and std
LCN_FLOOR = 0.3             # floor of the local std (global std 1): JPEG noise stays small
COPY_THRESHOLD = 0.90       # score >= this: a copy (some processed notumor copies score less)
SIMILAR_THRESHOLD = 0.50    # score in [0.50, 0.90): alike, probably a neighbouring slice
SIGNATURE_CACHE = "leak_signatures.npz"   # pixel hashes and signatures, keyed by file SHA-1
SIGNATURE_SETTINGS = f"thumb {THUMB_SIZE}, LCN sigma {LCN_SIGMA} floor {LCN_FLOOR}, float16"
PAIR_COLUMNS = ("a_path", "b_path", "a_label", "b_label", "transform", "score", "kind")
# T with T(a) ~ b: the 4 mirrors (MIRROR_DIMS: flipped dimensions) of a, then of a.T (flip_lr
# of a.T is the clockwise quarter turn rot270, as np.rot90(a, 3); flip_ud of a.T is rot90)
D4_NAMES = ("identity", "flip_lr", "flip_ud", "rot180", "transpose", "rot270", "rot90",
            "anti_transpose")
MIRROR_DIMS = ((), (-1,), (-2,), (-2, -1))


def area_resize(grey, size):
    """(H, W) -> (size, size) float64, each cell the mean over its exact footprint. Unlike PIL's
    BOX filter (224 -> 64 rounds the footprints) it commutes with mirroring: a mirror scores 1."""
    def weights(n):  # (size, n): overlap of output cell i with input cell k, over the cell size
        edges, cells = np.arange(size + 1) * n / size, np.arange(n + 1)  # output, input edges
        overlap = np.minimum(edges[1:, None], cells[1:]) - np.maximum(edges[:-1, None], cells[:-1])
        return overlap.clip(0) * size / n
    return weights(grey.shape[0]) @ np.asarray(grey, dtype=np.float64) @ weights(grey.shape[1]).T


def lcn_signatures(thumbnails):
    """(N, S, S) uint8 -> (N, S, S) float32 signatures of zero mean and norm 1; b -> alpha * b +
    beta leaves them unchanged; a flat image gets the zero signature (it scores 0)."""
    x = torch.from_numpy(np.asarray(thumbnails, dtype=np.float32))
    size, radius = x.shape[-1], int(math.ceil(3 * LCN_SIGMA))
    # Gaussian blur as a symmetric (S, S) matrix, edges replicated: commutes with D4, beats conv2d
    blur, rows = torch.zeros(size, size), torch.arange(size)
    for offset in range(-radius, radius + 1):
        blur[rows, (rows + offset).clamp(0, size - 1)] += math.exp(-offset**2 / 2 / LCN_SIGMA**2)
    blur = blur / blur.sum(1, keepdim=True)
    x = x / x.flatten(1).std(1).clamp_min(1e-3)[:, None, None]   # global contrast -> 1
    centred = x - blur @ x @ blur.T                               # minus the local mean
    lcn = centred / (blur @ centred ** 2 @ blur.T).sqrt().clamp_min(LCN_FLOOR)
    lcn = lcn - lcn.mean((1, 2), keepdim=True)
    return lcn / lcn.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]


def load_signatures(data_dir, paths, cache_dir=None, file_hashes=None):
    """(pixel hashes, (N, 64, 64) signatures) of data_dir/<path>, cached by file SHA-1 as float16
    (scores move < 1e-4). An undecodable file gets hash "undecodable:<SHA-1>", zero signature."""
    keys = [file_hashes[path] if file_hashes else file_hash(os.path.join(data_dir, path))
            for path in paths]
    cache_file = os.path.join(cache_dir or "", SIGNATURE_CACHE)
    cached = {}  # file SHA-1 -> (pixel hash, float16 signature)
    if cache_dir and os.path.exists(cache_file):
        try:  # the zip's CRC-32s catch flipped bytes, strict=True arrays of unequal length
            with np.load(cache_file) as stored:
                if str(stored["settings"]) != SIGNATURE_SETTINGS:
                    raise ValueError(f"made with {stored['settings']}")
                entries = zip(stored["hashes"].tolist(), stored["signatures"], strict=True)
                cached = dict(zip(stored["keys"].tolist(), entries, strict=True))
        except Exception as error:
            print(f"{cache_file}: damaged or stale ({type(error).__name__}: {error}); rebuilding")
    missing = {key: path for key, path in zip(keys, paths) if key not in cached}
    hashes, thumbs = [], np.zeros((len(missing), THUMB_SIZE, THUMB_SIZE), np.uint8)
    for k, (key, path) in enumerate(missing.items()):
        try:
            image = load_rgb(os.path.join(data_dir, path))
        except DecodeError as error:
            print(f"leak check: skipped {error}")
            hashes.append(f"undecodable:{key}")  # and a flat thumbnail: the zero signature
            continue
        pixels = np.asarray(image)
        hashes.append(hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest())
        thumbs[k] = area_resize(np.asarray(image.convert("L")), THUMB_SIZE).round().clip(0, 255)
    if missing:  # in chunks: the LCN's temporaries grow with the batch
        signatures = torch.cat([lcn_signatures(thumbs[k:k + 1024]).half()
                                for k in range(0, len(thumbs), 1024)])
        cached.update(zip(missing, zip(hashes, signatures.numpy())))
        if cache_dir:  # written to a temporary file, then renamed: never half a file
            stats.atomic_write(cache_file, lambda f: np.savez(
                f, settings=SIGNATURE_SETTINGS, keys=list(cached),
                hashes=[entry[0] for entry in cached.values()],
                signatures=np.stack([entry[1] for entry in cached.values()])))
    signatures = np.array([cached[key][1] for key in keys], np.float16)
    signatures = torch.from_numpy(signatures).float().reshape(-1, THUMB_SIZE, THUMB_SIZE)
    return [cached[key][0] for key in keys], signatures


def find_pairs(hashes, signatures_a, signatures_b=None, threshold=COPY_THRESHOLD, rows=512):
    """{(i, j): (kind, transform, score)} for score = max over T in D4 of <T(a_i), b_j> >=
    threshold (without b: i < j within a) and for identical decoded pixels (hashes: of a, then
    b). kind: exact, transformed or similar (score < COPY_THRESHOLD); transform in D4_NAMES."""
    within, n_a = signatures_b is None, len(signatures_a)
    b = (signatures_a if within else signatures_b).flatten(1)              # (M, S*S)
    found = {}
    for start in range(0, n_a, rows):  # rows of a at a time: scores take 8 x rows x M floats
        first = start if within else 0  # within one set only j >= start can have j > i
        chunk = signatures_a[start:start + rows]                            # (c, S, S)
        transformed = torch.stack([x.flip(dims) for x in (chunk, chunk.transpose(1, 2))
                                   for dims in MIRROR_DIMS])                # (8, c, S, S)
        best, transform = (transformed.flatten(2) @ b[first:].T).max(0)    # over (8, c, M - first)
        keep = best >= threshold
        if within:  # only j > i: not the diagonal, nor a pair counted from the other side
            keep &= torch.arange(first, n_a) > torch.arange(start, start + keep.shape[0])[:, None]
        for i, j in keep.nonzero().tolist():
            score = math.floor(best[i, j].item() * 1e4) / 1e4  # rounded down: keeps its kind
            found[start + i, first + j] = ("transformed" if score >= COPY_THRESHOLD else
                                           "similar", D4_NAMES[transform[i, j]], score)
    seen = {}  # pixel hash -> indices: identical decoded pixels are exact (flat images score 0)
    for j, digest in enumerate(hashes):
        for i in seen.setdefault(digest, []):
            if within or i < n_a <= j:  # i < j; across a and b: i in a, j in b
                found[i, j - (0 if within else n_a)] = ("exact", "identity", 1.0)
        seen[digest].append(j)
    return found


def test_paths_with_train_copy(data_dir, train_paths, test_paths, cache_dir=None, file_hashes=None):
    """test_paths with an exact or transformed copy in train_paths; file_hashes: {path: SHA-1}."""
    test_paths, train_paths = list(test_paths), list(train_paths)
    hashes, signatures = load_signatures(data_dir, test_paths + train_paths, cache_dir, file_hashes)
    pairs = find_pairs(hashes, signatures[:len(test_paths)], signatures[len(test_paths):])
    return {test_paths[i] for i, _ in pairs}


# ---- audit, leak-free split, merge -------------------------------------------------------------

def run_audit(data_dir, out_dir, cache_dir=None):
    """`data.py audit`: out_dir/pairs.csv (every exact, transformed or similar pair) and
    summary.json (images per split; per class, the test images with a copy in training)."""
    images = find_images(data_dir)[0]
    signatures = load_signatures(data_dir, [path for path, _, _ in images], cache_dir or out_dir)
    pairs = find_pairs(*signatures, threshold=SIMILAR_THRESHOLD)
    rows = [(images[i][0], images[j][0], images[i][1], images[j][1], transform, score, kind)
            for (i, j), (kind, transform, score) in sorted(pairs.items())]
    write_csv(os.path.join(out_dir, "pairs.csv"), [PAIR_COLUMNS] + rows)
    per_part = Counter(part or "all" for _, _, part in images)
    summary = {"data": os.path.abspath(data_dir), "images": dict(sorted(per_part.items()))}
    official = official_split_folders(data_dir)
    if official:  # a pair (i, j) has i < j: the training image first
        copied = {j for (i, j), (kind, _, _) in pairs.items() if kind != "similar"
                  and (images[i][2], images[j][2]) == official}
        test = [(k, label) for k, (_, label, part) in enumerate(images) if part == official[1]]
        summary["test_with_train_copy"] = {name: {
            "test_images": sum(name in ("all", label) for _, label in test),
            "with_copy": sum(name in ("all", label) and k in copied for k, label in test)}
            for name in ("all",) + CLASSES}
    stats.write_json(summary, os.path.join(out_dir, "summary.json"))
    kinds = Counter(row[-1] for row in rows)
    counts = ", ".join(f"{kinds[k]} {k}" for k in ("exact", "transformed", "similar"))
    print(f"{len(rows)} pairs ({counts}) in {out_dir}/pairs.csv; {out_dir}/summary.json:\n"
          f"{json.dumps(summary, indent=1)}")


def assign_groups_to_parts(group_labels, group_sizes, fractions, seed):
    """Part index of each group, stratified by label: within a label the groups go in seeded
    random order, each to the part furthest below its target (fraction x the label's images)."""
    rng, part_of_group = np.random.default_rng(seed), [0] * len(group_labels)
    for label in sorted(set(group_labels)):
        groups = [g for g, lab in enumerate(group_labels) if lab == label]
        total, filled = sum(group_sizes[g] for g in groups), [0] * len(fractions)
        for g in (groups[k] for k in rng.permutation(len(groups))):
            part = max(range(len(fractions)), key=lambda p: fractions[p] * total - filled[p])
            part_of_group[g] = part
            filled[part] += group_sizes[g]
    return part_of_group


def write_split(data_dir, out_csv, seed, leak_free, cache_dir=None):
    """`data.py split`: out_csv (path,label,split), a stratified 80/10/10 split of every image;
    leak_free: copies (exact, transformed) form one group, and whole groups go to one part."""
    from scipy.sparse import coo_matrix, csgraph
    images = find_images(data_dir)[0]
    paths = [path for path, _, _ in images]
    pairs = find_pairs(*load_signatures(data_dir, paths, cache_dir)) if leak_free else {}
    links = np.array(list(pairs), np.int64).reshape(-1, 2)  # (pairs, 2): the images of each copy
    graph = coo_matrix((np.ones(len(links)), links.T), shape=(len(images), len(images)))
    n_groups, group_of = csgraph.connected_components(graph, directed=False)
    counts = np.zeros((n_groups, len(CLASSES)), int)  # (groups, classes)
    np.add.at(counts, (group_of, [CLASSES.index(label) for _, label, _ in images]), 1)
    majority = counts.argmax(1).tolist()  # each group's label, ties to the first in CLASSES
    part_of_group = assign_groups_to_parts(majority, counts.sum(1).tolist(), (0.8, 0.1, 0.1), seed)
    parts = [("train", "val", "test")[part_of_group[group]] for group in group_of]
    write_csv(out_csv, [("path", "label", "split")] + [
        (path, label, part) for (path, label, _), part in zip(images, parts)])
    print(f"wrote {out_csv}: {len(images)} images in {n_groups} groups, "
          f"{'leak-free' if leak_free else 'plain'} split (seed {seed})")


def merge_datasets(sources, out_dir):
    """`data.py merge` into out_dir/<class>/, dropping images with a copy in an earlier source
    (not within one: `split --leak-free` groups those); manifest.csv says what became of each."""
    for source in map(os.path.realpath, sources):  # writing into a source would change it
        if os.path.commonpath([source, os.path.realpath(out_dir)]) == source:
            raise SystemExit(f"error: --out {out_dir}: inside the source {source}, which it "
                             f"would change; choose a folder outside every source")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SystemExit(f"error: {out_dir}: exists and is not an empty folder; choose a new --out")
    items = [(f"{number}-{os.path.basename(os.path.normpath(source))}",  # unique, e.g. 2-br35h
              os.path.join(source, path), label)  # label: a class, or a key of UNLABELLED_FOLDERS
             for number, source in enumerate(sources, start=1)
             for path, label, _ in find_images(source, UNLABELLED_FOLDERS)[0]]
    labelled = [k for k, item in enumerate(items) if item[2] not in UNLABELLED_FOLDERS]
    hashes, signatures = load_signatures("", [items[k][1] for k in labelled])
    undecodable = {k for k, h in zip(labelled, hashes) if h.startswith("undecodable")}
    original = {}  # dropped item -> (the item it copies: a kept one where a pair says so, how)
    pairs = find_pairs(hashes, signatures)  # i < j: i is in the same or an earlier source
    for (i, j), (kind, transform, score) in sorted(  # j in order, so i's fate is known; per j
            pairs.items(), key=lambda pair: (pair[0][1], pair[1][0] != "exact", -pair[1][2])):
        i, j = labelled[i], labelled[j]  # the strongest copy first: exact, then by score
        if items[i][0] != items[j][0] and (j not in original or original[j][0] in original
                                           and i not in original):  # within one source: stay
            how = transform.replace("identity", "resized/re-encoded")
            original[j] = (i, "exact" if kind == "exact" else how)
    rows = []  # one per item: its row of manifest.csv
    for k, (name, path, label) in enumerate(items):
        dest, copy_of, how = "", "", ""
        if label in UNLABELLED_FOLDERS:
            status, label = f"skipped: {UNLABELLED_FOLDERS[label]}", ""
        elif k in undecodable:
            status = "skipped: cannot decode image"
        elif k in original:
            i, how = original[k]
            while i in original:  # a copy of a dropped copy only: the kept image it leads to
                i = original[i][0]
            copy_of = rows[i][0]  # where the kept image was copied to
            status = "dropped (label conflict)" if items[i][2] != label else "dropped"
        else:
            dest = f"{label}/{os.path.basename(path)}"
            while os.path.exists(os.path.join(out_dir, dest)):  # name taken: prefix the source
                dest = f"{label}/{name}_{os.path.basename(dest)}"
            os.makedirs(os.path.join(out_dir, label), exist_ok=True)
            shutil.copyfile(path, os.path.join(out_dir, dest))
            status = "copied"
        rows.append((dest, path, name, label, status, copy_of, how))
    write_csv(os.path.join(out_dir, "manifest.csv"), [(
        "dest_path", "source_path", "source_dataset", "label", "status", "copy_of", "how")] + rows)
    status = Counter(row[4].split(" ")[0] for row in rows)
    conflicts = sum(row[4].endswith("(label conflict)") for row in rows)
    print(f"wrote {out_dir}: {status['copied']} copied, {status['dropped']} dropped as copies of "
          f"an earlier source's image ({conflicts} filed under another class), "
          f"{status['skipped:']} skipped; see manifest.csv, split with `data.py split`")


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = argparse.ArgumentParser(add_help=False)  # the options audit and split share
    dataset.add_argument("--data", required=True, help="dataset folder (Kaggle or class folders)")
    dataset.add_argument("--cache", help="signature folder, reused by later calls (audit: --out)")
    synth = commands.add_parser("synth", help="write a small synthetic MRI-like dataset")
    synth.add_argument("--out", required=True, help="new folder to write (Kaggle layout)")
    synth.add_argument("--per-class", type=int, default=60, help="training images per class")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    audit = commands.add_parser("audit", parents=[dataset], help="find copies among the images")
    audit.add_argument("--out", required=True, help="folder for pairs.csv and summary.json")
    split = commands.add_parser("split", parents=[dataset], help="write an 80/10/10 split CSV")
    split.add_argument("--out", required=True, help="CSV to write, columns path,label,split")
    split.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    split.add_argument("--leak-free", action="store_true", help="keep copies in one part")
    split.add_argument("--seed", type=int, default=42, help="seed of the split")
    merge = commands.add_parser("merge", help="merge datasets, one image per group of copies")
    merge.add_argument("sources", nargs="+", metavar="SRC", help="dataset folders, first wins")
    merge.add_argument("--out", required=True, help="new or empty folder to write")
    args = parser.parse_args(argv)
    if args.command == "synth":
        write_synthetic_dataset(args.out, args.per_class, args.seed)
        print(f"wrote {args.out}: Training/, Testing/ (class folders), lesions.csv, captions.csv")
    elif args.command == "audit":
        run_audit(args.data, args.out, args.cache)
    elif args.command == "split":
        stats.check_new_output(args.out, args.overwrite)  # no output replaced unasked
        write_split(args.data, args.out, args.seed, args.leak_free, args.cache)
    else:
        merge_datasets(args.sources, args.out)


if __name__ == "__main__":
    main()
