"""Issue 21, method correctness round 3: each test fails on the code before the fix.

- The LR each optimizer step actually uses (read by a hook, the whole loop driven) is torch's
  CosineAnnealingWarmRestarts at the start of the step (scheduler.step(epoch + i / iters)), after
  a linear warm-up: the last step of a cycle runs near 0, not at the full rate.
- Class prompts are encoded with the text tower in eval mode: a text tower with dropout (a tiny
  Hugging Face BERT, as BiomedCLIP's) gives the same prompts under two seeds, = encode_text.
- test_leak_free.loss is the loss of the leak-free images (recomputed from predictions.csv), and
  report.txt says the part is copy-free, not patient-level.
- --no-cache draws fresh augmentations from (seed, epoch, image); the cache's fixed views are
  said to be shared by every seed in config.json.
- Exact adversarial training says what its train curve averages (metrics adversarial_training).
- Weight decay skips gains, biases and the logit scale (open_clip's rule); the cosine head's
  scale stops at 100; BLIP's linear probe caches the CLS token alone; the timm CLS-only block
  without a qkv bias follows the weights' dtype/device; an adversarial view of an image under
  two classes is refused; a report that fails to render leaves the earlier report.txt whole.
"""
import argparse
import copy
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import BertConfig, BertModel, BertTokenizer

import blip_tumor
import clip_tumor
import data
import stats
from conftest import assert_cached_path_equals_full_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def run(data_dir, config, tmp_path, *extra):
    return clip_tumor.main(["--data", data_dir, "--model", config, "--pretrained", "none",
                            "--views", "1", "--lr", "1e-3", "--cache-dir",
                            str(tmp_path / "cache"), *extra])


def test_each_step_uses_the_schedule_at_its_start(small_dir, tiny_clip_config, tmp_path):
    used = []  # (lr of each group) at every optimizer step of the run
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, *_: used.append([g["lr"] for g in optimizer.param_groups]))
    try:
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "7", "--batch-size", "4",
            "--out", str(tmp_path / "run"))
    finally:
        hook.remove()
    steps = 28 // 4  # 32 training images, 4 of them validate (stratified 10 %)
    assert len(used) == 7 * steps and all(len(set(lrs)) == 1 for lrs in used)
    reference = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(reference, T_0=5)
    for i, (lr, *_) in enumerate(used):
        epoch, step = divmod(i, steps)
        if epoch == 0:  # one epoch of linear warm-up, from 0
            assert lr == pytest.approx(1e-3 * step / steps, abs=1e-12)
        else:  # torch's documented per-iteration use: scheduler.step(epoch + i / iters)
            schedule.step(epoch - 1 + step / steps)
            assert lr == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
    assert used[6 * steps - 1][0] < 0.01 * 1e-3  # epoch 6 ends its cycle near 0 (was 1.0 x)
    assert used[6 * steps][0] == pytest.approx(1e-3)  # epoch 7 restarts at the full rate


def test_prompts_are_encoded_in_eval_mode(tmp_path):
    """A text tower with dropout 0.1 (open_clip's Hugging Face tower, BiomedCLIP's kind)."""
    folder = tmp_path / "tiny-bert"
    words = {w for c in data.CLASSES for w in clip_tumor.PROMPT.format(
        clip_tumor.PROMPT_NAMES[c]).lower().split()}
    BertTokenizer(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words))}).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, hidden_dropout_prob=0.1)).save_pretrained(folder)
    config = dict(clip_tumor.TINY_CONFIG, text_cfg={
        "hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "linear",
        "hf_pooler_type": "cls_pooler", "context_length": 16})
    (tmp_path / "clip-hf-text.json").write_text(json.dumps(config))
    clip_model, tokenizer, _ = clip_tumor.load_clip(str(tmp_path / "clip-hf-text.json"), "none")
    assert clip_model.text.transformer.config.hidden_dropout_prob == 0.1
    prompts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = clip_tumor.CLIPClassifier(copy.deepcopy(clip_model).train(), tokenizer, "cosine",
                                          "tiny", "none", 2)
        prompts.append(model.class_prompts)
    with torch.no_grad():
        texts = [clip_tumor.PROMPT.format(clip_tumor.PROMPT_NAMES[c]) for c in data.CLASSES]
        expected = clip_model.eval().encode_text(tokenizer(texts)).float()
    torch.testing.assert_close(prompts[0], prompts[1], rtol=0, atol=0)
    torch.testing.assert_close(prompts[0], torch.nn.functional.normalize(expected, dim=-1))


def test_leak_free_loss_is_the_leak_free_images_loss(tiny_clip_config, tmp_path):
    from PIL import ImageOps, Image
    root = data.write_synthetic_dataset(str(tmp_path / "data"), per_class=8, seed=3)
    for k in range(3):  # three mirrored copies of training images in Testing/
        original = Image.open(os.path.join(root, "Training", "glioma", f"glioma_000{k}.jpg"))
        ImageOps.mirror(original).save(os.path.join(root, "Testing", "glioma", f"copy{k}.png"))
    metrics = run(root, tiny_clip_config, tmp_path, "--epochs", "2", "--out", str(tmp_path / "r"))
    with open(tmp_path / "r" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {row["path"]: -math.log(float(row[f"p_{row['label']}"])) for row in rows}
    leak_free = [loss for path, loss in losses.items() if "copy" not in path]
    assert metrics["test_leak_free"]["loss"] == pytest.approx(np.mean(leak_free), abs=1e-4)
    assert metrics["test"]["loss"] == pytest.approx(np.mean(list(losses.values())), abs=1e-4)
    assert metrics["test"]["loss"] != pytest.approx(metrics["test_leak_free"]["loss"], abs=1e-3)
    assert "(copy-free, not patient-level" in (tmp_path / "r" / "report.txt").read_text()


def test_no_cache_draws_fresh_augmentations_from_seed_and_epoch(small_dir, tiny_clip_config,
                                                                tmp_path, monkeypatch):
    drawn = []  # (seed, content hash, view) of every augmented view made
    original = data.image_view

    def recording(image, content_hash, view, size):
        pixels = original(image, content_hash, view, size)
        if view != 0:
            drawn.append((seed, content_hash, view, pixels.sum().item()))
        return pixels
    monkeypatch.setattr(data, "image_view", recording)
    for seed in (1, 2):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "2", "--views", "2", "--no-cache",
            "--seed", str(seed), "--out", str(tmp_path / f"s{seed}"))
    by_image = {}
    for seed, content_hash, view, total in drawn:
        by_image.setdefault(content_hash, set()).add((seed, view, total))
    sums = [{total for _, _, total in views} for views in by_image.values() if len(views) > 1]
    assert sums and all(len(totals) > 1 for totals in sums)  # never the same view twice
    config = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert config["augmentation"].startswith("fresh every epoch")
    cached = run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out",
                 str(tmp_path / "cached"))
    assert cached["cached"] and "shared by every seed" in json.loads(
        (tmp_path / "cached" / "config.json").read_text())["augmentation"]


def test_exact_adversarial_training_says_what_its_curve_averages(small_dir, tiny_clip_config,
                                                                 tmp_path):
    metrics = run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--no-cache",
                  "--adversarial", "fgsm", "--out", str(tmp_path / "exact"))
    assert metrics["adversarial_training"].startswith("fgsm, exact")
    assert "trained 1:1 with the clean one" in metrics["adversarial_training"]


def test_weight_decay_spares_gains_biases_and_the_logit_scale(small_dir, tiny_clip_config,
                                                              tmp_path, monkeypatch):
    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(adamw(*a, **k)) or
                        made[-1])
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--weight-decay", "0.1",
        "--out", str(tmp_path / "run"))
    model = clip_tumor.build_model(argparse.Namespace(
        model=tiny_clip_config, pretrained="none", head="cosine", seed=42, benchmark=False,
        epochs=1, trainable_blocks=2))
    # open_clip's training/main.py: exclude = p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in n
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or \
        "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {p.shape for g in made[0].param_groups if g["weight_decay"] == 0.1
               for p in g["params"]}
    spared = sum(len(g["params"]) for g in made[0].param_groups if g["weight_decay"] == 0)
    assert spared == sum(exclude(n, p) for n, p in named) > 0
    assert decayed == {p.shape for n, p in named if not exclude(n, p)}


def test_cosine_scale_stops_at_100_as_clip_clamps_it(tiny_clip_config):
    model = clip_tumor.build_model(argparse.Namespace(
        model=tiny_clip_config, pretrained="none", head="cosine", seed=0, benchmark=False,
        epochs=1, trainable_blocks=2)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000))
        cls = torch.randn(3, 128)
        logits = model.classify(cls)
        image = torch.nn.functional.normalize(model.visual.ln_post(cls) @ model.visual.proj, dim=-1)
    torch.testing.assert_close(logits, 100 * image @ model.class_prompts.t())


def test_blip_linear_probe_caches_the_cls_token_alone(tiny_blip_weights):
    model = blip_tumor.build_model(argparse.Namespace(
        weights=tiny_blip_weights, image_size=64, head="cosine", seed=0, benchmark=False,
        epochs=1, trainable_blocks=0))
    images, labels = torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 3])
    stored = assert_cached_path_equals_full_forward(model.eval(), images, labels)
    assert stored.shape == (3, 1, 64)


def test_timm_cls_only_block_without_qkv_bias_follows_the_weights_dtype():
    from timm.models.vision_transformer import Block
    block = Block(64, 4, qkv_bias=False).double().eval()
    tokens = torch.randn(2, 5, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clip_tumor.cls_only_block(block, tokens), block(tokens)[:, :1])


def test_adversarial_view_of_an_image_under_two_classes_is_refused(tiny_clip_config, small_dir,
                                                                   tmp_path):
    root = shutil.copytree(small_dir, tmp_path / "data")
    for k in range(8):  # whichever of them the split puts in training
        shutil.copy(root / "Training" / "glioma" / f"glioma_000{k}.jpg",
                    root / "Training" / "pituitary" / f"same{k}.jpg")
    with pytest.raises(SystemExit, match=r"(same|glioma_000)\d.jpg: a byte-identical copy of it "
                                         r"is in another class folder"):
        run(str(root), tiny_clip_config, tmp_path, "--epochs", "1", "--adversarial", "fgsm",
            "--val-fraction", "0.25", "--out", str(tmp_path / "run"))


def test_a_report_that_fails_leaves_the_earlier_files_whole(tmp_path, monkeypatch):
    y, probs = np.array([0, 1, 2, 3]), np.eye(4)
    arguments = (str(tmp_path), {"model": "m"}, [], ["a", "b", "c", "d"], y, probs,
                 data.CLASSES, "header")
    stats.write_run_folder(*arguments)
    before = {name: (tmp_path / name).read_text() for name in ("report.txt", "predictions.csv")}

    def failing(*_):
        raise RuntimeError("cannot render")
    monkeypatch.setattr(stats, "classification_report", failing)
    with pytest.raises(RuntimeError):
        stats.write_run_folder(*arguments)
    assert {name: (tmp_path / name).read_text() for name in before} == before
