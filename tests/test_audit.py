"""Leak audit, leak-free split and merge (data.py, issue 6) on small synthetic images.

Each "scan" is a random smooth texture inside an ellipse, different for every scan. Copies are
made the ways the Kaggle release makes them (byte copy, PNG of the decoded JPEG, mirror,
rotation, transpose, gamma/linear contrast, JPEG re-encoding); a "neighbouring slice" shares
the head outline and half of the texture. Run: python -m pytest -q tests/test_audit.py (~10 s).
"""
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
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
    add("Testing/meningioma/upside_down.jpg", ("meningioma", 1), "transformed", "flip_ud",
        originals["meningioma", 1][1][::-1])
    gamma = (255 * (originals["notumor", 0][1] / 255.0) ** 0.6).astype(np.uint8)
    add("Testing/notumor/gamma.jpg", ("notumor", 0), "transformed", "identity+intensity", gamma)
    linear = (0.6 * originals["notumor", 1][1] + 40).astype(np.uint8)
    add("Testing/notumor/contrast_rot180.jpg", ("notumor", 1), "transformed",
        "rot180+intensity", np.rot90(linear, 2))
    add("Testing/pituitary/reencoded.jpg", ("pituitary", 0), "transformed", "identity",
        jpeg_roundtrip(originals["pituitary", 0][1], 40), quality=60)
    _, _, head, texture = originals["pituitary", 1]
    add("Testing/pituitary/neighbour.jpg", ("pituitary", 1), "similar", None,
        neighbouring_slice(head, texture, np.random.default_rng(5)))
    # a copy filed under another class: a label conflict
    add("Testing/notumor/mislabelled.jpg", ("meningioma", 2), "transformed", "flip_lr",
        originals["meningioma", 2][1][:, ::-1])
    return root, expected


def read_pairs(out_dir):
    with open(os.path.join(out_dir, "pairs.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_audit_finds_each_copy_with_its_kind_and_transform(leaky_dir, tmp_path):
    root, expected = leaky_dir
    out = str(tmp_path / "audit")
    data.main(["audit", "--data", root, "--out", out])
    rows = read_pairs(out)
    assert list(rows[0]) == list(data.PAIR_COLUMNS)
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
    overall = summary["test_with_train_copy"]["overall"]
    n_copies = sum(kind != "similar" for _, kind, _ in expected.values())
    assert overall["test_images"] == 12 + len(expected)
    assert overall["with_copy"] == n_copies
    assert overall["with_exact_copy"] == 2
    assert overall["with_similar_only"] == 1
    assert summary["test_with_train_copy"]["per_class"]["glioma"]["with_copy"] == 4
    assert summary["label_conflicts"]["pairs"]["transformed"] == 1
    assert summary["pairs"]["exact"] == {"across splits": 2}
    for kind in ("exact", "transformed", "similar"):
        assert os.path.getsize(os.path.join(out, f"contact_{kind}.png")) > 0


def test_scores_are_invariant_to_flips_and_intensity_and_separate_neighbours():
    rng = np.random.default_rng(3)
    scan, head, texture = synthetic_scan(rng)
    variants = [scan] + [np.ascontiguousarray(t(scan)) for t in (
        lambda x: x[:, ::-1], lambda x: np.rot90(x, 3), lambda x: np.rot90(x, 2).T)]
    variants.append((0.5 * scan + 100).astype(np.uint8))
    thumbnails = np.stack([data.area_resize(v, 64).round().astype(np.uint8) for v in variants])
    i, j, _, score = data.matching_pairs(data.lcn_signatures(thumbnails), None, 0.0,
                                         progress=False)
    assert len(i) == 10 and score.min() > 0.99  # every pair of the 5 versions is a copy
    neighbour = neighbouring_slice(head, texture, np.random.default_rng(4))
    stranger = synthetic_scan(rng)[0]
    thumbnails = np.stack([data.area_resize(v, 64).round().astype(np.uint8)
                           for v in (scan, neighbour, stranger)])
    _, b, _, score = data.matching_pairs(data.lcn_signatures(thumbnails[:1]),
                                         data.lcn_signatures(thumbnails[1:]), -1.0,
                                         progress=False)
    scores = dict(zip(b.tolist(), score.tolist()))
    assert data.SIMILAR_THRESHOLD <= scores[0] < data.COPY_THRESHOLD  # neighbour: similar
    assert scores[1] < data.SIMILAR_THRESHOLD                         # stranger: nothing


def test_area_resize_matches_exact_area_weights_and_commutes_with_flips():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (224, 200))

    def weights(n_in, n_out):  # overlap of output cell i with input cell k, over the cell size
        edges = np.arange(n_out + 1) * n_in / n_out
        cells = np.arange(n_in)
        overlap = (np.minimum(edges[1:, None], cells + 1) - np.maximum(edges[:-1, None], cells))
        return overlap.clip(0) * n_out / n_in

    resized = data.area_resize(image, 64)
    np.testing.assert_allclose(resized, weights(224, 64) @ image @ weights(200, 64).T, atol=1e-9)
    np.testing.assert_allclose(data.area_resize(image[:, ::-1], 64), resized[:, ::-1], atol=1e-9)
    np.testing.assert_allclose(data.area_resize(np.rot90(image), 64), np.rot90(resized),
                               atol=1e-9)


def test_test_paths_with_train_copy_and_its_cache(leaky_dir, tmp_path, monkeypatch):
    root, expected = leaky_dir
    images = data.find_audit_images(root)
    train = [p for p, _, part in images if part == "Training"]
    test = [p for p, _, part in images if part == "Testing"]
    copies = {p for p, (_, kind, _) in expected.items() if kind != "similar"}
    cache = str(tmp_path / "cache")
    assert data.test_paths_with_train_copy(root, train, test, cache) == copies
    # second call, on a subset (as after a validation carve-out): answered from the cache alone
    monkeypatch.setattr(data, "image_signature", lambda path: pytest.fail("decoded " + path))
    assert data.test_paths_with_train_copy(root, train[::2], test, cache) == \
        {p for p in copies if expected[p][0] in train[::2]}
    assert data.test_paths_with_train_copy(root, [], test, cache) == set()


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
    splits = data.read_split_csv(out, root)  # the training scripts' reader accepts it
    counts = {name: [sum(s.label == c for s in getattr(splits, name)) for c in range(4)]
              for name in ("train", "val", "test")}
    for c in range(4):  # 9-13 images per class: each part within one group of its target
        total = sum(counts[name][c] for name in counts)
        assert abs(counts["train"][c] - 0.8 * total) <= 2 and counts["test"][c] >= 1, counts
    # the same seed gives the same split; --strict also joins the neighbour to its original
    again = str(tmp_path / "again.csv")
    data.main(["split", "--data", root, "--out", again, "--leak-free", "--seed", "1"])
    assert open(again).read() == open(out).read()
    strict_rows, _ = data.make_split(root, 1, leak_free=True, strict=True, progress=False)
    strict = {p: s for p, _, s in strict_rows}
    assert strict["Testing/pituitary/neighbour.jpg"] == strict[expected[
        "Testing/pituitary/neighbour.jpg"][0]]


def test_plain_split_is_stratified_per_image():
    labels = ["glioma"] * 50 + ["notumor"] * 30
    sizes = [1] * len(labels)
    parts = data.assign_groups_to_parts([data.CLASSES.index(x) for x in labels], sizes,
                                        data.SPLIT_FRACTIONS, seed=0)
    for name, n in (("glioma", 50), ("notumor", 30)):
        members = [p for p, label in zip(parts, labels) if label == name]
        assert [members.count(k) for k in range(3)] == [round(0.8 * n), round(0.1 * n),
                                                        round(0.1 * n)]


def test_merge_maps_aliases_drops_duplicates_and_never_overwrites(tmp_path):
    rng = np.random.default_rng(7)
    scans = [synthetic_scan(rng)[0] for _ in range(6)]
    kaggle, br35h, figshare = (str(tmp_path / n) for n in ("kaggle", "br35h", "figshare"))
    save(scans[0], f"{kaggle}/Training/glioma_tumor/a.jpg")
    save(scans[1], f"{kaggle}/Testing/no_tumor/b.jpg")
    save(scans[1], f"{kaggle}/Testing/.ipynb_checkpoints/b-checkpoint.jpg")  # hidden: ignored
    save(scans[2], f"{br35h}/no/no1.jpg")
    save(scans[3], f"{br35h}/yes/y1.jpg")                                    # no 4-class label
    shutil.copyfile(f"{kaggle}/Training/glioma_tumor/a.jpg", f"{tmp_path}/dup.jpg")
    os.makedirs(f"{figshare}/Glioma")
    shutil.copyfile(f"{tmp_path}/dup.jpg", f"{figshare}/Glioma/copy_of_a.jpg")  # duplicate
    save(scans[4], f"{figshare}/Glioma/a.jpg")              # same name as kaggle's a.jpg
    save(scans[5], f"{figshare}/Pituitary Tumor/p.png")
    out = str(tmp_path / "merged")
    data.main(["merge", kaggle, br35h, figshare, "--out", out])
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        manifest = {os.path.relpath(r["source_path"], str(tmp_path)): r
                    for r in csv.DictReader(f)}
    assert len(manifest) == 7
    # not every source has Training/Testing, so the merge is plain class folders
    assert manifest["kaggle/Training/glioma_tumor/a.jpg"]["dest_path"] == "glioma/a.jpg"
    assert manifest["kaggle/Testing/no_tumor/b.jpg"]["dest_path"] == "notumor/b.jpg"
    assert manifest["br35h/no/no1.jpg"]["label"] == "notumor"
    assert manifest["br35h/yes/y1.jpg"]["status"].startswith("skipped:")
    assert manifest["figshare/Glioma/copy_of_a.jpg"]["status"] == "duplicate_of:glioma/a.jpg"
    assert manifest["figshare/Glioma/a.jpg"]["dest_path"] == "glioma/figshare_a.jpg"
    assert manifest["figshare/Pituitary Tumor/p.png"]["dest_path"] == "pituitary/p.png"
    assert np.array_equal(decoded(f"{out}/glioma/figshare_a.jpg"),
                          decoded(f"{figshare}/Glioma/a.jpg"))
    assert sorted(os.listdir(out)) == ["glioma", "manifest.csv", "notumor", "pituitary"]
    with pytest.raises(SystemExit, match="not an empty folder"):
        data.main(["merge", kaggle, "--out", out])
    # only Kaggle-layout sources: the official split is kept
    both = str(tmp_path / "both")
    data.main(["merge", kaggle, "--out", both])
    assert os.path.isfile(f"{both}/Training/glioma/a.jpg")
    assert os.path.isfile(f"{both}/Testing/notumor/b.jpg")
