"""CLIP classifier: the fast paths equal the slow ones, the cache is safe, training works."""
import csv
import json
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import clip_tumor
import data
import engine


def tiny_model(config, head="cosine", seed=0):
    args = clip_tumor.parse_args(["--model", config, "--pretrained", "none", "--head", head,
                                  "--seed", str(seed)])
    return clip_tumor.build_model(args)


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
    params = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads(forward):
        logits = forward()
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), params, allow_unused=True)
        return logits.detach(), grads

    full_logits, full_grads = logits_and_grads(lambda: model(images))
    with torch.no_grad():
        tokens = model.stem(images)
    cached_logits, cached_grads = logits_and_grads(lambda: model.top(tokens))
    assert torch.allclose(cached_logits, full_logits, atol=1e-4)
    for g_full, g_cached in zip(full_grads, cached_grads):
        assert (g_full is None) == (g_cached is None)
        if g_full is not None:
            assert torch.allclose(g_cached, g_full, atol=1e-4)


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
    cache = engine.FeatureCache(str(tmp_path / "cache"), model.cache_key)
    samples = data.load_splits(synth_dir, 0).test[:5]
    hashes = {s.path: data.file_hash(os.path.join(synth_dir, s.path)) for s in samples}
    jobs = {s.path: (hashes[s.path], 2) for s in samples}
    engine.build_cache(model, cache, jobs, synth_dir, "cpu", 4, False)
    # stored fp16 features equal the stem's float32 output to fp16 precision
    image = data.load_rgb(os.path.join(synth_dir, samples[0].path))
    with torch.no_grad():
        expected = model.stem(data.image_view(image, hashes[samples[0].path], 1, 64)[None])[0]
    stored = cache.get([hashes[samples[0].path]], [1])[0]
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-3)

    calls = []
    original_stem = model.stem
    model.stem = lambda x: calls.append(len(x)) or original_stem(x)
    engine.build_cache(model, cache, jobs, synth_dir, "cpu", 4, False)
    assert calls == []  # everything was cached: the stem never ran
    jobs[samples[0].path] = (hashes[samples[0].path], 3)  # one more view: only it is computed
    engine.build_cache(model, cache, jobs, synth_dir, "cpu", 4, False)
    assert calls == [1]
    # another stem (different weights) is a different folder: nothing stale is read
    other = engine.FeatureCache(str(tmp_path / "cache"), tiny_model(tiny_clip_config,
                                                                    seed=1).cache_key)
    assert other.dir != cache.dir and not other.has(hashes[samples[0].path], 0)


def test_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = engine.FeatureCache(str(tmp_path), {"model": "x"})

    def crash(path, array):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put("ab" * 20, 0, torch.zeros(3, 4))
    assert not cache.has("ab" * 20, 0)


def test_training_learns_synthetic_set_and_writes_run_folder(tiny_clip_config, synth_dir,
                                                             tmp_path):
    out = tmp_path / "run"
    metrics = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "20",
                                       "--out", str(out)))
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
    probs = np.array([[float(r[f"p_{c}"]) for c in data.CLASSES] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    accuracy = np.mean([r["label"] == r["pred"] for r in rows])
    assert accuracy == pytest.approx(saved["test"]["accuracy"])


def test_resume_after_interruption_gives_same_result(tiny_clip_config, synth_dir, tmp_path,
                                                     monkeypatch):
    whole = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "3",
                                     "--out", str(tmp_path / "whole")))
    saves = []
    original = engine.atomic_save

    def killed_after_first_epoch(obj, path):
        original(obj, path)
        if path.endswith("checkpoint.pt"):
            saves.append(path)
            if len(saves) == 1:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1

    monkeypatch.setattr(engine, "atomic_save", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
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
    assert metrics["best_epoch"] == 0 and 0 <= metrics["test"]["accuracy"] <= 1
    with pytest.raises(SystemExit, match="run folder exists"):
        clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "0",
                                 "--out", str(out)))


def test_unavailable_weights_give_one_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(SystemExit, match="--pretrained /path/to"):
        clip_tumor.load_clip("ViT-B-16", "openai")


def test_seeds_run_each_seed_and_summarise(tiny_clip_config, synth_dir, tmp_path):
    out = tmp_path / "seeds"
    summary = clip_tumor.main(run_args(synth_dir, tiny_clip_config, tmp_path, "--epochs", "1",
                                       "--seeds", "3,4", "--out", str(out)))
    accuracies = [json.loads((out / f"seed{s}" / "metrics.json").read_text())["test"]["accuracy"]
                  for s in (3, 4)]
    assert summary["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["metrics"]["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert json.loads((out / "summary.json").read_text())["n_runs"] == 2


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
