"""Copies: the leak audit, every run's leak check, the leak-free split and merge (data.py).

Each "scan" is a random smooth texture inside an ellipse, different for every scan. Copies are
made the ways the Kaggle release and its sources make them (byte copy, PNG of the decoded JPEG,
mirror, rotation, transpose, gamma/linear contrast, JPEG re-encoding, resizing); a
"neighbouring slice" shares the head outline and half of the texture. What is pinned down:
- the audit finds each copy with its kind and D4 transform, and nothing between independent
  scans; find_pairs' 8-transform score and transform name match products of independently
  rotated signatures; area_resize is an exact area average;
- test_paths_with_train_copy returns exactly the test images with a copy in train, on the
  official layout and on a seeded 80/20 split of class folders, from the cache alone once it
  exists; a truncated or corrupted signature cache is reported and rebuilt, same answer;
- the leak-free split keeps copies in one part; merge keeps exactly one image per group of
  cross-source copies (resized, re-encoded, mirrored) and names the original of each drop; over
  three sources with chained copies (a third source's copy of a second source's dropped copy)
  exactly the first image of each group is kept, and every manifest row is pinned: a chained
  drop's `how` and label conflict are those of the kept image that copy_of names.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_audit.py
"""
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data


def synthetic_scan(rng, size=96, texture=None):
    """(size, size) uint8 'MRI slice', the head mask and the texture it was made from."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    head = (xx / rng.uniform(0.36, 0.44)) ** 2 + (yy / rng.uniform(0.40, 0.46)) ** 2 < 1
    if texture is None:  # structure at several scales, like gyri and ventricles
        texture = sum(ndimage.gaussian_filter(rng.normal(size=(size, size)), s) * s
                      for s in (1.5, 3, 6))
        texture = texture / texture.std()
    pixels = np.where(head, 110 + 40 * texture, 0)
    return pixels.clip(0, 255).astype(np.uint8), head, texture


def neighbouring_slice(head, texture, rng, mix=1.0):
    """Same head outline, texture rotated by `mix` radians towards an independent one."""
    other = synthetic_scan(rng)[2]
    texture = np.cos(mix) * texture + np.sin(mix) * other
    return np.where(head, 110 + 40 * texture, 0).clip(0, 255).astype(np.uint8)


def save(pixels, path, quality=95):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality) if path.endswith(".jpg") \
        else Image.fromarray(pixels).save(path)


def decoded(path):
    return np.asarray(Image.open(path).convert("L"))


def jpeg_roundtrip(pixels, quality):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


@pytest.fixture(scope="module")
def leaky_dir(tmp_path_factory):
    """Kaggle layout: 6 originals per class in Training/, copies of some of them in Testing/.

    Returns (data folder, {test path: (training path, expected kind, expected transform)}).
    """
    root = str(tmp_path_factory.mktemp("leaky") / "data")
    rng = np.random.default_rng(0)
    originals = {}
    for name in data.CLASSES:
        for k in range(6):
            pixels, head, texture = synthetic_scan(rng)
            path = f"Training/{name}/{name}_{k}.jpg"
            save(pixels, os.path.join(root, path))
            originals[name, k] = (path, decoded(os.path.join(root, path)), head, texture)
        for k in range(3):  # test images that are new scans: no copy anywhere
            save(synthetic_scan(rng)[0], os.path.join(root, f"Testing/{name}/{name}_new{k}.jpg"))
    g = originals["glioma", 0][1]
    m = originals["meningioma", 0][1]
    expected = {}

    def add(test_path, source, kind, transform, pixels, quality=95):
        save(pixels, os.path.join(root, test_path), quality)
        expected[test_path] = (originals[source][0], kind, transform)

    shutil.copyfile(os.path.join(root, originals["glioma", 1][0]),
                    os.path.join(root, "Testing/glioma/byte_copy.jpg"))
    expected["Testing/glioma/byte_copy.jpg"] = (originals["glioma", 1][0], "exact", "identity")
    add("Testing/glioma/png_copy.png", ("glioma", 2), "exact", "identity",
        originals["glioma", 2][1])  # decoded JPEG saved as PNG: other bytes, same pixels
    add("Testing/glioma/mirrored.jpg", ("glioma", 0), "transformed", "flip_lr", g[:, ::-1])
    add("Testing/glioma/rotated.jpg", ("glioma", 3), "transformed", "rot90",
        np.rot90(originals["glioma", 3][1]))
    add("Testing/meningioma/transposed.jpg", ("meningioma", 0), "transformed", "transpose",
        np.ascontiguousarray(m.T))
    add("Testing/meningioma/turned_clockwise.jpg", ("meningioma", 3), "transformed", "rot270",
        np.rot90(originals["meningioma", 3][1], 3))
    add("Testing/meningioma/upside_down.jpg", ("meningioma", 1), "transformed", "flip_ud",
        originals["meningioma", 1][1][::-1])
    gamma = (255 * (originals["notumor", 0][1] / 255.0) ** 0.6).astype(np.uint8)
    add("Testing/notumor/gamma.jpg", ("notumor", 0), "transformed", "identity", gamma)
    linear = (0.6 * originals["notumor", 1][1] + 40).astype(np.uint8)
    add("Testing/notumor/contrast_rot180.jpg", ("notumor", 1), "transformed", "rot180",
        np.rot90(linear, 2))
    add("Testing/pituitary/reencoded.jpg", ("pituitary", 0), "transformed", "identity",
        jpeg_roundtrip(originals["pituitary", 0][1], 40), quality=60)
    _, _, head, texture = originals["pituitary", 1]
    add("Testing/pituitary/neighbour.jpg", ("pituitary", 1), "similar", None,
        neighbouring_slice(head, texture, np.random.default_rng(5)))
    # a copy filed under another class: a label conflict
    add("Testing/notumor/mislabelled.jpg", ("meningioma", 2), "transformed", "flip_lr",
        originals["meningioma", 2][1][:, ::-1])
    return root, expected


def test_audit_finds_each_copy_with_its_kind_and_transform(leaky_dir, tmp_path):
    root, expected = leaky_dir
    out = str(tmp_path / "audit")
    data.main(["audit", "--data", root, "--out", out])
    with open(os.path.join(out, "pairs.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == data.PAIR_COLUMNS
    by_pair = {(r["a_path"], r["b_path"]): r for r in rows}
    for test_path, (train_path, kind, transform) in expected.items():
        row = by_pair.get((train_path, test_path))
        assert row is not None, f"missed {train_path} -> {test_path}"
        assert row["kind"] == kind, (test_path, row)
        if transform:
            assert row["transform"] == transform, (test_path, row)
    # nothing else: independent scans are never linked, not even as similar
    assert len(rows) == len(expected), [r for r in rows if r["b_path"] not in expected]
    summary = json.load(open(os.path.join(out, "summary.json")))
    n_copies = sum(kind != "similar" for _, kind, _ in expected.values())
    assert summary["images"] == {"Testing": 12 + len(expected), "Training": 24}
    copies = summary["test_with_train_copy"]
    assert copies["all"] == {"test_images": 12 + len(expected), "with_copy": n_copies}
    assert copies["glioma"] == {"test_images": 7, "with_copy": 4}
    assert copies["notumor"]["with_copy"] == 3 and copies["pituitary"]["with_copy"] == 1
    assert os.path.isfile(os.path.join(out, data.SIGNATURE_CACHE))  # cached next to the report


def test_scores_are_invariant_to_flips_and_intensity_and_separate_neighbours():
    rng = np.random.default_rng(3)
    scan, head, texture = synthetic_scan(rng)
    variants = [scan] + [np.ascontiguousarray(t(scan)) for t in (
        lambda x: x[:, ::-1], lambda x: np.rot90(x, 3), lambda x: np.rot90(x, 2).T)]
    variants.append((0.5 * scan + 100).astype(np.uint8))
    thumbnails = np.stack([data.area_resize(v, 64).round().astype(np.uint8) for v in variants])
    pairs = data.find_pairs(list("abcde"), data.lcn_signatures(thumbnails), threshold=0.0)
    assert len(pairs) == 10 and min(score for _, _, score in pairs.values()) > 0.99
    assert [pairs[0, j][1] for j in (1, 2, 3, 4)] == ["flip_lr", "rot270", "anti_transpose",
                                                      "identity"]
    neighbour = neighbouring_slice(head, texture, np.random.default_rng(4))
    stranger = synthetic_scan(rng)[0]
    thumbnails = np.stack([data.area_resize(v, 64).round().astype(np.uint8)
                           for v in (scan, neighbour, stranger)])
    signatures = data.lcn_signatures(thumbnails)
    pairs = data.find_pairs(list("abc"), signatures[:1], signatures[1:], threshold=-1.0)
    assert data.SIMILAR_THRESHOLD <= pairs[0, 0][2] < data.COPY_THRESHOLD  # neighbour: similar
    assert pairs[0, 1][2] < data.SIMILAR_THRESHOLD                         # stranger: nothing


def test_d4_scores_and_names_equal_those_of_independent_rotations():
    rng = np.random.default_rng(1)
    signatures = data.lcn_signatures(rng.integers(0, 255, (7, 64, 64)).astype(np.uint8))
    transforms = {"identity": lambda x: x, "flip_lr": lambda x: x.flip(-1),
                  "flip_ud": lambda x: x.flip(-2), "rot180": lambda x: x.flip(-2, -1),
                  "transpose": lambda x: x.transpose(-2, -1),
                  "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),      # as np.rot90
                  "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
                  "anti_transpose": lambda x: x.flip(-2, -1).transpose(-2, -1)}
    assert set(transforms) == set(data.D4_NAMES)
    a, b = signatures[:3], signatures[3:]
    plain = torch.stack([transforms[name](a).flatten(1) @ b.flatten(1).T
                         for name in data.D4_NAMES])                   # (8, 3, 4)
    pairs = data.find_pairs([str(k) for k in range(7)], a, b, threshold=-2.0, rows=2)
    assert len(pairs) == 12
    for (i, j), (kind, transform, score) in pairs.items():
        assert abs(score - plain[:, i, j].max().item()) < 2e-4
        assert transform == data.D4_NAMES[plain[:, i, j].argmax()]
    # a mirrored copy among strangers: found, with the transform that maps a onto it
    copy = transforms["rot90"](a[1:2])
    pairs = data.find_pairs([str(k) for k in range(4)], a, copy, threshold=data.COPY_THRESHOLD)
    assert list(pairs) == [(1, 0)] and pairs[1, 0][:2] == ("transformed", "rot90")


def test_area_resize_is_an_exact_area_average_and_commutes_with_flips():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (45, 37))
    # oracle: repeat each pixel 8 x 8 times, then average blocks of 45 x 37 (exact areas)
    fine = np.repeat(np.repeat(image, 8, axis=0), 8, axis=1)
    expected = fine.reshape(8, 45, 8, 37).mean(axis=(1, 3))
    resized = data.area_resize(image, 8)
    np.testing.assert_allclose(resized, expected, atol=1e-9)
    np.testing.assert_allclose(data.area_resize(image[:, ::-1], 8), resized[:, ::-1], atol=1e-9)
    np.testing.assert_allclose(data.area_resize(np.rot90(image), 8), np.rot90(resized),
                               atol=1e-9)


def test_leak_check_official_split_cache_and_damaged_cache(leaky_dir, tmp_path, monkeypatch,
                                                           capsys):
    root, expected = leaky_dir
    images = data.find_images(root)[0]
    train = [p for p, _, part in images if part == "Training"]
    test = [p for p, _, part in images if part == "Testing"]
    copies = {p for p, (_, kind, _) in expected.items() if kind != "similar"}
    cache = str(tmp_path / "cache")
    assert data.test_paths_with_train_copy(root, train, test, cache) == copies
    # second call, on a subset (as after a validation carve-out): answered from the cache alone
    monkeypatch.setattr(data, "load_rgb", lambda path: pytest.fail("decoded " + path))
    assert data.test_paths_with_train_copy(root, train[::2], test, cache) == \
        {p for p in copies if expected[p][0] in train[::2]}
    assert data.test_paths_with_train_copy(root, [], test, cache) == set()
    monkeypatch.undo()
    cache_file = os.path.join(cache, data.SIGNATURE_CACHE)
    content = open(cache_file, "rb").read()
    with np.load(cache_file) as stored:
        clean = {name: stored[name] for name in stored.files}
    for damaged in (content[:len(content) // 2],                      # a cut-off write
                    content[:5000] + bytes([content[5000] ^ 0xFF]) + content[5001:]):  # a flip
        open(cache_file, "wb").write(damaged)
        capsys.readouterr()
        assert data.test_paths_with_train_copy(root, train, test, cache) == copies
        assert "leak_signatures.npz: damaged or stale" in capsys.readouterr().out
        with np.load(cache_file) as stored:                               # rebuilt, the same
            assert all(np.array_equal(stored[name], clean[name]) for name in clean)


def test_leak_check_on_a_seeded_split_of_class_folders(tmp_path):
    """A class-folder layout with copies: the run's 80/20 split puts some copies in test and
    their originals in train; exactly those test images are reported."""
    rng = np.random.default_rng(11)
    root, partner = tmp_path / "folders", {}
    for name in data.CLASSES:
        for k in range(10):
            scan = synthetic_scan(rng, size=64)[0]
            save(scan, str(root / name / f"{k}.png"))
            if k < 4:  # a mirrored, re-encoded copy of the first four scans of each class
                save(scan[:, ::-1], str(root / name / f"{k}_copy.jpg"), quality=70)
                partner[f"{name}/{k}.png"] = f"{name}/{k}_copy.jpg"
    partner.update({copy: original for original, copy in list(partner.items())})
    splits = data.load_splits(str(root), seed=3, val_fraction=0.1)
    train = [s.path for s in splits.train + splits.val]
    test = [s.path for s in splits.test]
    expected = {p for p in test if partner.get(p) in train}
    assert 0 < len(expected) < len(test)
    assert data.test_paths_with_train_copy(str(root), train, test, str(tmp_path / "c")) == expected


def test_leak_free_split_keeps_groups_together_and_is_stratified(leaky_dir, tmp_path):
    root, expected = leaky_dir
    out = str(tmp_path / "split.csv")
    data.main(["split", "--data", root, "--out", out, "--leak-free", "--seed", "1"])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "split"] and len(rows) == 24 + 12 + len(expected)
    part = {r["path"]: r["split"] for r in rows}
    for test_path, (train_path, kind, _) in expected.items():
        if kind != "similar":
            assert part[test_path] == part[train_path], test_path
    splits = data.load_splits(root, 0, split_csv=out)  # the training scripts' reader accepts it
    counts = {name: [sum(s.label == c for s in getattr(splits, name)) for c in range(4)]
              for name in ("train", "val", "test")}
    for c in range(4):  # 9-13 images per class: each part within one group of its target
        total = sum(counts[name][c] for name in counts)
        assert abs(counts["train"][c] - 0.8 * total) <= 2 and counts["test"][c] >= 1, counts
    again = str(tmp_path / "again.csv")  # the same seed gives the same split
    data.main(["split", "--data", root, "--out", again, "--leak-free", "--seed", "1"])
    assert open(again).read() == open(out).read()


def test_plain_split_is_stratified_per_image():
    labels = ["glioma"] * 50 + ["notumor"] * 30
    parts = data.assign_groups_to_parts([data.CLASSES.index(x) for x in labels], [1] * 80,
                                        (0.8, 0.1, 0.1), seed=0)
    for name, n in (("glioma", 50), ("notumor", 30)):
        members = [p for p, label in zip(parts, labels) if label == name]
        assert [members.count(k) for k in range(3)] == [round(0.8 * n), round(0.1 * n),
                                                        round(0.1 * n)]


def read_manifest(out, base):
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        return {os.path.relpath(r["source_path"], base): r for r in csv.DictReader(f)}


def test_merge_keeps_one_image_per_group_of_cross_source_copies(tmp_path):
    """A second source made of resized, re-encoded and mirrored copies of a first one's images,
    plus new scans: only the new scans are copied, each drop names its original and how."""
    rng = np.random.default_rng(7)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    scans = {}
    for name in ("glioma", "meningioma", "pituitary"):
        for k in range(3):
            scans[name, k] = synthetic_scan(rng)[0]                        # 96 px
            save(scans[name, k], f"{first}/{name}/{name}{k}.jpg")
    second_of = {  # second-source file: (original in the first source, how)
        "Glioma/small.jpg": ("glioma/glioma0.jpg", "resized/re-encoded"),   # 96 -> 64, q 70
        "Glioma/big.png": ("glioma/glioma1.jpg", "resized/re-encoded"),     # 96 -> 192
        "Meningioma/mirror.jpg": ("meningioma/meningioma0.jpg", "flip_lr"),
        "Meningioma/same.jpg": ("meningioma/meningioma1.jpg", "exact"),     # byte copy
        "Pituitary Tumor/turned.jpg": ("pituitary/pituitary0.jpg", "rot90"),
        "Meningioma/mislabelled.jpg": ("pituitary/pituitary1.jpg", "resized/re-encoded")}
    resize = lambda pixels, size: np.asarray(Image.fromarray(pixels).resize((size, size),
                                                                            Image.BICUBIC))
    save(resize(scans["glioma", 0], 64), f"{second}/Glioma/small.jpg", quality=70)
    save(resize(scans["glioma", 1], 192), f"{second}/Glioma/big.png")
    save(scans["meningioma", 0][:, ::-1], f"{second}/Meningioma/mirror.jpg", quality=80)
    shutil.copyfile(f"{first}/meningioma/meningioma1.jpg", f"{second}/Meningioma/same.jpg")
    save(np.rot90(resize(scans["pituitary", 0], 80)), f"{second}/Pituitary Tumor/turned.jpg")
    save(resize(scans["pituitary", 1], 128), f"{second}/Meningioma/mislabelled.jpg")
    new = {"Glioma/new.jpg", "Meningioma/new.png", "no/new.jpg", "Glioma/glioma0.jpg"}
    for path in new:  # new scans (glioma0.jpg: a name the first source already uses)
        save(synthetic_scan(rng)[0], f"{second}/{path}")
    save(synthetic_scan(rng)[0], f"{second}/yes/unlabelled.jpg")           # Br35H yes/: skipped
    new.add("Glioma/new_mirrored.jpg")  # a copy within one source stays (the split handles it)
    save(decoded(f"{second}/Glioma/new.jpg")[:, ::-1], f"{second}/Glioma/new_mirrored.jpg")
    out = str(tmp_path / "merged")
    data.main(["merge", first, second, "--out", out])
    manifest = read_manifest(out, second)
    copied = {path for path, row in manifest.items() if row["status"] == "copied"}
    assert copied == new | {os.path.join("..", "first", f"{n}/{n}{k}.jpg") for n, k in scans}
    for path, (original, how) in second_of.items():
        row = manifest[path]
        assert row["status"].startswith("dropped") and row["dest_path"] == "", row
        assert (row["copy_of"], row["how"]) == (original, how), row
    assert manifest["Meningioma/mislabelled.jpg"]["status"] == "dropped (label conflict)"
    assert manifest["yes/unlabelled.jpg"]["status"].startswith("skipped: Br35H yes/")
    assert manifest["Glioma/glioma0.jpg"]["dest_path"] == "glioma/2-second_glioma0.jpg"
    assert manifest["no/new.jpg"]["dest_path"] == "notumor/new.jpg"
    assert np.array_equal(decoded(f"{out}/glioma/2-second_glioma0.jpg"),
                          decoded(f"{second}/Glioma/glioma0.jpg"))
    assert sorted(os.listdir(out)) == ["glioma", "manifest.csv", "meningioma", "notumor",
                                       "pituitary"]
    with pytest.raises(SystemExit, match="not an empty folder"):
        data.main(["merge", first, "--out", out])


@pytest.fixture(scope="module")
def merge_chain(tmp_path_factory):
    """Three sources merged in order, with copies across them, some of them chained (a third
    source's file copying a second source's file that copies a first source's file).

    Returns (the sources' parent folder, the merged folder, {file: (dest_path, status, copy_of,
    how)}), the manifest each file should get, paths relative to the parent folder."""
    rng, root = np.random.default_rng(21), tmp_path_factory.mktemp("chain")
    scan = lambda: synthetic_scan(rng)[0]
    resize = lambda pixels, size: np.asarray(Image.fromarray(pixels).resize((size, size),
                                                                            Image.BICUBIC))
    a0, a1, m0, p0, b_new = scan(), scan(), scan(), scan(), scan()
    for path, pixels in (("first/glioma/a0.jpg", a0), ("first/glioma/a1.jpg", a1),
                         ("first/meningioma/m0.jpg", m0), ("first/pituitary/p0.jpg", p0),
                         ("second/Glioma/b_mirror.jpg", a0[:, ::-1]),       # copies a0
                         ("second/Glioma/b_new.jpg", b_new),                # new
                         ("second/Meningioma/b_conflict.jpg", resize(p0, 128)),  # p0, misfiled
                         ("third/glioma/c_of_b.jpg", np.rot90(b_new)),      # copies b_new
                         ("third/meningioma/c_direct.jpg", resize(m0, 64)),  # copies m0
                         ("third/glioma/a1.jpg", scan()),                   # new, a used name
                         ("third/no_tumor/c_new.jpg", scan())):             # new
        save(pixels, str(root / path))
    # chained: byte copies of the second source's copies
    shutil.copyfile(root / "second/Glioma/b_mirror.jpg", root / "third/glioma/c_chain.jpg")
    shutil.copyfile(root / "second/Meningioma/b_conflict.jpg",
                    root / "third/meningioma/c_chain_conflict.jpg")
    out = str(root / "merged")
    data.main(["merge", str(root / "first"), str(root / "second"), str(root / "third"),
               "--out", out])
    expected = {
        "first/glioma/a0.jpg": ("glioma/a0.jpg", "copied", "", ""),
        "first/glioma/a1.jpg": ("glioma/a1.jpg", "copied", "", ""),
        "first/meningioma/m0.jpg": ("meningioma/m0.jpg", "copied", "", ""),
        "first/pituitary/p0.jpg": ("pituitary/p0.jpg", "copied", "", ""),
        "second/Glioma/b_mirror.jpg": ("", "dropped", "glioma/a0.jpg", "flip_lr"),
        "second/Glioma/b_new.jpg": ("glioma/b_new.jpg", "copied", "", ""),
        "second/Meningioma/b_conflict.jpg": ("", "dropped (label conflict)", "pituitary/p0.jpg",
                                             "resized/re-encoded"),
        "third/glioma/a1.jpg": ("glioma/3-third_a1.jpg", "copied", "", ""),
        "third/glioma/c_of_b.jpg": ("", "dropped", "glioma/b_new.jpg", "rot90"),
        "third/meningioma/c_direct.jpg": ("", "dropped", "meningioma/m0.jpg",
                                          "resized/re-encoded"),
        "third/no_tumor/c_new.jpg": ("notumor/c_new.jpg", "copied", "", ""),
        # the chain: each names the kept image of its group, and how it copies that image
        "third/glioma/c_chain.jpg": ("", "dropped", "glioma/a0.jpg", "flip_lr"),
        "third/meningioma/c_chain_conflict.jpg": ("", "dropped (label conflict)",
                                                  "pituitary/p0.jpg", "resized/re-encoded")}
    return str(root), out, expected


CHAINED = ("third/glioma/c_chain.jpg", "third/meningioma/c_chain_conflict.jpg")


def test_merge_of_three_sources_keeps_one_image_per_group_across_a_chain(merge_chain):
    """Exactly the first image of each group of copies is copied (byte for byte; a name taken
    by an earlier source is prefixed with the source), every other file is dropped naming that
    kept image, including a third source's copy of a second source's dropped copy."""
    root, out, expected = merge_chain
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    manifest = {os.path.relpath(row["source_path"], root): row for row in rows}
    assert set(manifest) == set(expected) and len(rows) == len(expected)
    for path, (dest, status, copy_of, how) in expected.items():
        row = manifest[path]
        assert row["source_dataset"] == {"first": "1-first", "second": "2-second",
                                         "third": "3-third"}[path.split("/")[0]], row
        assert (row["dest_path"], row["copy_of"]) == (dest, copy_of), row
        if path in CHAINED:  # their status and how: the test below
            assert row["status"].startswith("dropped"), row
        else:
            assert (row["status"], row["how"]) == (status, how), row
    kept = {dest: path for path, (dest, *_) in expected.items() if dest}
    assert sorted(data.files_under(out)) == sorted(
        [os.path.join(out, dest) for dest in kept] + [os.path.join(out, "manifest.csv")])
    for dest, path in kept.items():
        with open(os.path.join(out, dest), "rb") as copy, open(os.path.join(root, path),
                                                               "rb") as source:
            assert copy.read() == source.read(), dest


def test_merge_chain_says_how_each_drop_copies_the_kept_image(merge_chain):
    """A byte copy of the second source's mirror of a0 is a mirror of a0 (copy_of), not an
    exact copy of it; a byte copy of the second source's misfiled copy of p0, filed like it,
    conflicts with p0's label as that copy does."""
    root, out, expected = merge_chain
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        manifest = {os.path.relpath(row["source_path"], root): row for row in csv.DictReader(f)}
    for path in CHAINED:
        row = manifest[path]
        assert (row["status"], row["copy_of"], row["how"]) == expected[path][1:], row


def test_merge_of_a_kaggle_layout_writes_class_folders(tmp_path):
    rng = np.random.default_rng(8)
    kaggle = str(tmp_path / "kaggle")
    save(synthetic_scan(rng)[0], f"{kaggle}/Training/glioma_tumor/a.jpg")
    save(synthetic_scan(rng)[0], f"{kaggle}/Testing/no_tumor/b.jpg")
    save(synthetic_scan(rng)[0], f"{kaggle}/Testing/.ipynb_checkpoints/b-checkpoint.jpg")
    merged = str(tmp_path / "merged")
    data.main(["merge", kaggle, "--out", merged])
    assert sorted(os.listdir(merged)) == ["glioma", "manifest.csv", "notumor"]
    assert os.listdir(f"{merged}/glioma") == ["a.jpg"]
    assert os.listdir(f"{merged}/notumor") == ["b.jpg"]
    assert len(read_manifest(merged, kaggle)) == 2  # the hidden folder is ignored
