"""clip_tumor.py: the fast paths equal the slow ones, the cache is safe, the loop and run work.

- cls_only_block equals the full block's CLS output (1e-5); our embedding equals open_clip's own;
  cached-path logits and gradients equal the full forward's (1e-4) for every head; the trainable
  set is open_clip's lock_image_tower(unlocked_groups=3).
- Feature cache: fp16 entries equal the stem's output to fp16 precision, reuse (the stem never
  runs twice), staleness (other weights -> other folder), an interrupted write leaves no entry.
- Runs: the tiny model learns the synthetic set (>= 0.9) and writes the run folder; resume after
  a kill equals an uninterrupted run; --select-on test is announced; zero-shot (its accuracy is
  predictions.csv's); the offline message; the leak-free test part; --skip-bad; --demo's log
  has one line per epoch holding the checkpoint's history.
- Losses (focal vs its formula and CE, hybrid, balanced weights vs sklearn), and inside a run
  (--loss focal, --loss hybrid --class-weights: each step's loss equals the formula written out
  on its logits, with sklearn's weights of the run's training labels); the LR schedule vs
  torch's CosineAnnealingWarmRestarts, out-of-range options named in one error.
"""
import argparse
import csv
import json
import os
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import clip_tumor
import data
from conftest import assert_cached_path_equals_full_forward, kill_after_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny_model(config, head="cosine", seed=0, trainable_blocks=2):
    return clip_tumor.build_model(argparse.Namespace(
        model=config, pretrained="none", head=head, seed=seed, benchmark=False, epochs=1,
        trainable_blocks=trainable_blocks))


def run_args(synth_dir, config, tmp_path, *extra):
    return ["--data", synth_dir, "--model", config, "--pretrained", "none", "--views", "2",
            "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_cls_only_block_equals_full_block(tiny_clip_config):
    model = tiny_model(tiny_clip_config)
    tokens = torch.randn(3, 65, 128)
    block = model.top_blocks[-1]
    full = block(tokens)[:, :1]
    assert torch.allclose(clip_tumor.cls_only_block(block, tokens), full, atol=1e-5)


def test_embed_matches_open_clip_forward(tiny_clip_config):
    """Our stem + top reproduce open_clip's own image embedding exactly."""
    model = tiny_model(tiny_clip_config)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        theirs = model.visual((images - model.mean) / model.std)
        ours = model.visual.ln_post(model.visual.transformer(model.embed(images))[:, 0]) \
            @ model.visual.proj
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("head", ["cosine", "mlp", "fusion"])
def test_cached_path_gives_same_logits_and_gradients_as_full_forward(tiny_clip_config, head):
    model = tiny_model(tiny_clip_config, head)
    model.train()
    images = torch.rand(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert_cached_path_equals_full_forward(model, images, labels)


def test_trainable_parameters_are_what_open_clip_unlocks(tiny_clip_config):
    """Last 2 blocks, ln_post and proj: open_clip's lock_image_tower(unlocked_groups=3)."""
    model = tiny_model(tiny_clip_config)
    ours = {n.removeprefix("visual.") for n, p in model.named_parameters()
            if p.requires_grad and n.startswith("visual.")}
    reference = open_clip.create_model("clip-tiny", pretrained=None)
    reference.lock_image_tower(unlocked_groups=3)
    theirs = {n for n, p in reference.visual.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert {n for n, p in model.named_parameters() if p.requires_grad} - \
        {"visual." + n for n in ours} == {"logit_scale"}
    assert len(model.stem_blocks) == 2 and len(model.top_blocks) == 2


def test_feature_cache_round_trip_reuse_and_staleness(tiny_clip_config, synth_dir, tmp_path):
    model = tiny_model(tiny_clip_config)
    cache = data.FeatureCache(str(tmp_path / "cache"), model)
    samples = data.load_splits(synth_dir, 0).test[:5]
    hashes = {s.path: data.file_hash(os.path.join(synth_dir, s.path)) for s in samples}
    jobs = {s.path: (hashes[s.path], [0, 1]) for s in samples}
    data.build_cache(model, cache, jobs, synth_dir, 4, False)
    # stored fp16 features equal the stem's float32 output to fp16 precision
    image = data.load_rgb(os.path.join(synth_dir, samples[0].path))
    with torch.no_grad():
        expected = model.stem(data.image_view(image, hashes[samples[0].path], 1, 64)[None])[0]
    stored = cache.read(cache.path(hashes[samples[0].path], 1))
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-3)

    calls = []
    original_stem = model.stem
    model.stem = lambda x: calls.append(len(x)) or original_stem(x)
    data.build_cache(model, cache, jobs, synth_dir, 4, False)
    assert calls == []  # everything was cached: the stem never ran
    jobs[samples[0].path] = (hashes[samples[0].path], [0, 1, 2])  # one more view: only it is computed
    data.build_cache(model, cache, jobs, synth_dir, 4, False)
    assert calls == [1]
    # another stem (different weights) is a different folder: nothing stale is read
    other = data.FeatureCache(str(tmp_path / "cache"), tiny_model(tiny_clip_config, seed=1))
    assert other.dir != cache.dir
    assert not os.path.exists(other.path(hashes[samples[0].path], 0))


def test_interrupted_cache_write_leaves_no_entry(tiny_clip_config, tmp_path, monkeypatch):
    cache = data.FeatureCache(str(tmp_path), tiny_model(tiny_clip_config))
    original = clip_tumor.hashlib.sha1

    def crash(payload):
        raise KeyboardInterrupt  # killed after the temporary file was opened

    monkeypatch.setattr(clip_tumor.hashlib, "sha1", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put("ab" * 20, 0, torch.zeros(3, 4))
    monkeypatch.setattr(clip_tumor.hashlib, "sha1", original)
    folder = os.path.dirname(cache.path("ab" * 20, 0))
    assert not os.path.exists(cache.path("ab" * 20, 0)) and os.listdir(folder) == []


def test_training_learns_synthetic_set_and_writes_run_folder(trained_clip_run):
    out, metrics = trained_clip_run  # conftest.py: 12 epochs, 1 view, lr 1e-3
    assert metrics["test"]["accuracy"] >= 0.9
    for name in ("config.json", "metrics.json", "predictions.csv", "report.txt",
                 "confusion_matrix.png", "curves.png", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert set(saved) >= {"train", "val", "test", "best_epoch", "seconds_per_epoch",
                          "cache_build_seconds"}
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 40 and rows[0]["path"].startswith("Testing/")
    assert saved["n_test_with_train_copy"] == 0 and "test_leak_free" not in saved
    assert "0 of 40 test images have an exact or transformed copy" in (out / "report.txt").read_text()
    probs = np.array([[float(r[f"p_{c}"]) for c in data.CLASSES] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    accuracy = np.mean([r["label"] == r["pred"] for r in rows])
    assert accuracy == pytest.approx(saved["test"]["accuracy"])


def test_resume_after_interruption_gives_same_result(tiny_clip_config, synth_dir, tmp_path,
                                                     monkeypatch):
    whole = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "3",
                                     "--out", str(tmp_path / "whole")))
    kill_after_first_checkpoint(monkeypatch, clip_tumor)
    with pytest.raises(SystemExit, match="Ctrl-C.*--resume"):
        clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "3",
                                 "--out", str(tmp_path / "split")))
    resumed = clip_tumor.main(["--resume", str(tmp_path / "split")])
    assert resumed["best_epoch"] == whole["best_epoch"]
    for part in ("train", "val", "test"):
        assert resumed[part]["accuracy"] == whole[part]["accuracy"]
        assert resumed[part]["loss"] == pytest.approx(whole[part]["loss"], abs=1e-6)


def test_select_on_test_is_announced_everywhere(tiny_clip_config, synth_dir, tmp_path):
    out = tmp_path / "paper"
    metrics = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "1",
                                       "--select-on", "test", "--out", str(out)))
    assert "test set" in metrics["selection"] and metrics["val"] is None
    assert "optimistic" in (out / "report.txt").read_text()


def test_zero_shot_and_existing_run_folder(tiny_clip_config, synth_dir, tmp_path):
    out = tmp_path / "zs"
    metrics = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "0",
                                       "--out", str(out)))
    rows = list(csv.DictReader(open(out / "predictions.csv")))  # the zero-shot predictions
    assert len(rows) == metrics["test"]["n"] == 40
    assert metrics["best_epoch"] == 0 and metrics["test"]["accuracy"] == pytest.approx(
        np.mean([row["label"] == row["pred"] for row in rows]), abs=1e-12)
    with pytest.raises(SystemExit, match="run folder exists"):
        clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "0",
                                 "--out", str(out)))


def test_unavailable_weights_give_one_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(SystemExit, match="--pretrained /path/to"):
        clip_tumor.load_clip("ViT-B-16", "openai")


def test_official_split_also_reports_the_leak_free_test_part(tiny_clip_config, tmp_path):
    """A mirrored copy of a training image placed in Testing/ is excluded from test_leak_free."""
    from PIL import Image, ImageOps
    root = data.write_synthetic_dataset(str(tmp_path / "data"), per_class=8, seed=3)
    original = Image.open(os.path.join(root, "Training", "glioma", "glioma_0002.jpg"))
    ImageOps.mirror(original).save(os.path.join(root, "Testing", "glioma", "copy.png"))
    metrics = clip_tumor.main(run_args(root, tiny_clip_config, tmp_path, "--epochs", "0",
                                       "--out", str(tmp_path / "run")))
    leak_free = metrics["test_leak_free"]
    assert leak_free["n_test_with_train_copy"] == 1
    assert leak_free["n"] == metrics["test"]["n"] - 1 == 20


def test_undecodable_image_stops_the_run_unless_skip_bad(tiny_clip_config, tmp_path):
    root = data.write_synthetic_dataset(str(tmp_path / "data"), per_class=8, seed=4)
    broken = os.path.join(root, "Training", "pituitary", "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated JPEG")
    with pytest.raises(SystemExit, match="broken.jpg: cannot decode image"):
        clip_tumor.main(run_args(root, tiny_clip_config, tmp_path, "--epochs", "0",
                                 "--out", str(tmp_path / "a")))
    metrics = clip_tumor.main(run_args(root, tiny_clip_config, tmp_path, "--epochs", "0",
                                       "--skip-bad", "--out", str(tmp_path / "b")))
    assert metrics["undecodable_skipped"] == 1
    assert "broken.jpg" in (tmp_path / "b" / "report.txt").read_text()
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["undecodable_skipped"] == ["Training/pituitary/broken.jpg"]
    assert sum(config["counts"]["train"]) + sum(config["counts"]["val"]) == 32


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_matches_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(12, 4), torch.randint(0, 4, (12,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert torch.allclose(clip_tumor.focal_loss(logits, targets, gamma=0.0),
                          F.cross_entropy(logits, targets), atol=1e-6)
    assert torch.allclose(clip_tumor.focal_loss(logits, targets, weight, gamma=0.0),
                          F.cross_entropy(logits, targets, weight=weight), atol=1e-6)
    # gamma = 2, written out per sample: -(1 - p_t)^2 log p_t, weighted mean
    p = logits.softmax(-1)[torch.arange(12), targets].double()
    w = weight[targets].double()
    expected = (w * -(1 - p) ** 2 * p.log()).sum() / w.sum()
    assert clip_tumor.focal_loss(logits, targets, weight).item() == pytest.approx(expected.item(),
                                                                              rel=1e-5)


def test_hybrid_loss_is_the_mean_of_ce_and_focal():
    logits, targets = torch.randn(8, 4), torch.randint(0, 4, (8,))
    hybrid = clip_tumor.make_loss("hybrid", None)(logits, targets)
    expected = 0.5 * (F.cross_entropy(logits, targets) + clip_tumor.focal_loss(logits, targets))
    assert torch.allclose(hybrid, expected)


def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.array([0] * 10 + [1] * 30 + [2] * 5 + [3] * 55)
    ours = clip_tumor.balanced_class_weights(labels, 4).numpy()
    theirs = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    assert np.allclose(ours, theirs)


def imbalanced_split(data_dir, path, train_per_class=(7, 4, 2, 5)):
    """A split CSV of small_dir (8 training images per class): the first n_c training images of
    class c train, the last one validates, Testing/ tests."""
    rows = [("path", "label", "split")]
    for name, n_train in zip(data.CLASSES, train_per_class):
        rows += [(f"Training/{name}/{name}_{k:04d}.jpg", name, "train") for k in range(n_train)]
        rows += [(f"Training/{name}/{name}_0007.jpg", name, "val")]
        rows += [(f"Testing/{name}/{name}_{k:04d}.jpg", name, "test") for k in range(5)]
    data.write_csv(str(path), rows)
    return str(path)


@pytest.mark.parametrize("loss, weighted", [("focal", False), ("hybrid", True)])  # hybrid: CE
def test_the_loss_options_are_the_loss_a_run_trains_on(loss, weighted, tiny_clip_config,
                                                        small_dir, tmp_path, monkeypatch,
                                                        one_thread):
    """--loss and --class-weights inside a run (imbalanced training set 7/4/2/5): the loop's loss
    is built once, with sklearn's 'balanced' weights of the run's training labels (or none);
    each step's loss equals the formula written out in NumPy (CE, focal with gamma 2, their
    mean; weighted means) on that step's logits; epoch 1's train_loss is their mean per image."""
    from scipy.special import log_softmax
    from sklearn.utils.class_weight import compute_class_weight
    made, steps, original = [], [], clip_tumor.make_loss

    def recording_make_loss(name, class_weight):
        made.append((name, class_weight))
        loss_fn = original(name, class_weight)

        def recorded(logits, labels):
            value = loss_fn(logits, labels)
            steps.append((logits.detach().double().numpy(), labels.numpy(), value.item()))
            return value
        return recorded

    monkeypatch.setattr(clip_tumor, "make_loss", recording_make_loss)
    out, split = tmp_path / "run", imbalanced_split(small_dir, tmp_path / "split.csv")
    clip_tumor.main(["--data", small_dir, "--split", split,
                     "--model", tiny_clip_config, "--pretrained", "none", "--views", "1",
                     "--epochs", "1", "--batch-size", "4", "--loss", loss,
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
                    + ["--class-weights"] * weighted)
    counts = json.loads((out / "config.json").read_text())["counts"]["train"]
    assert counts == [7, 4, 2, 5]
    weight = compute_class_weight("balanced", classes=np.arange(4),
                                  y=np.repeat(np.arange(4), counts)) if weighted else np.ones(4)
    assert len(made) == 1 and made[0][0] == loss
    assert made[0][1] is None if not weighted else np.allclose(made[0][1].numpy(), weight)
    assert len(steps) == 18 // 4  # 18 images, batches of 4, the ragged one dropped
    for logits, labels, value in steps:
        log_p = log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
        w = weight[labels]
        ce = np.sum(w * -log_p) / w.sum()
        focal = np.sum(w * -(1 - np.exp(log_p)) ** 2 * log_p) / w.sum()
        expected = {"ce": ce, "focal": focal, "hybrid": (ce + focal) / 2}[loss]
        assert value == pytest.approx(expected, rel=1e-5)
    history = clip_tumor.load_checkpoint(str(out / "checkpoint.pt"))["history"]
    per_image = sum(value * len(labels) for _, labels, value in steps) / sum(
        len(labels) for _, labels, _ in steps)
    assert history[0]["train_loss"] == pytest.approx(per_image, rel=1e-9)


def test_out_of_range_options_are_named_in_one_error(tiny_clip_config, synth_dir):
    with pytest.raises(SystemExit, match=r"--views 0: at least 1.*--val-fraction 1.5"):
        clip_tumor.main(["--data", synth_dir, "--model", tiny_clip_config, "--pretrained", "none",
                         "--views", "0", "--val-fraction", "1.5"])
    with pytest.raises(SystemExit, match="--split nope.csv: no such file"):
        clip_tumor.main(["--data", synth_dir, "--split", "nope.csv"])


def test_learning_rate_follows_torch_warm_restarts_and_warms_up():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=5)
    for epoch in range(12):
        for step in range(4):
            scheduler.step(epoch + (step + 1) / 4)
            ours = clip_tumor.learning_rate(epoch + (step + 1) / 4, 3e-4, warmup_epochs=0)
            assert ours == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
    assert clip_tumor.learning_rate(0.5, 3e-4, warmup_epochs=1) == pytest.approx(1.5e-4)
    assert clip_tumor.learning_rate(1.0, 3e-4, warmup_epochs=1) == pytest.approx(3e-4)


def test_demo_defaults_yield_to_the_options_given(tmp_path, monkeypatch, capsys):
    """--demo supplies defaults only: --out, --epochs and --seed win, nothing goes under runs/,
    and a log (not a terminal) gets one line per epoch, in order, whose numbers are the epoch's
    history in checkpoint.pt (rounded as printed), and no progress-bar redraws."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "X"
    clip_tumor.main(["--demo", "--out", str(out), "--epochs", "3", "--seed", "7"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["seed"] == 7 and not (tmp_path / "runs").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["data"].endswith("data-v3") and config["args"]["cache_dir"]
    log = capsys.readouterr()
    text = log.out + log.err
    assert data.PROGRESS or "\r" not in text  # a log: no bars
    number = r"(\d+\.\d{4})"
    line = re.compile(rf"epoch (\d+)/3: train loss {number} accuracy {number} \| "
                      rf"val loss {number} accuracy {number} \| (\d+\.\d)s")
    printed = [line.fullmatch(row) for row in text.splitlines() if row.startswith("epoch ")]
    assert all(printed) and len(printed) == 3, text
    history = clip_tumor.load_checkpoint(str(out / "checkpoint.pt"))["history"]
    for match, entry, epoch in zip(printed, history, (1, 2, 3), strict=True):
        assert int(match[1]) == entry["epoch"] == epoch
        for k, key in enumerate(("train_loss", "train_accuracy", "select_loss",
                                 "select_accuracy"), start=2):
            assert float(match[k]) == round(entry[key], 4), (key, match[0], entry)
