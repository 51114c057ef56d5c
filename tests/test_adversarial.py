"""Issue 13: FGSM and PGD (clip_tumor.attack), adversarial training and robustness evaluation.

- FGSM equals clamp(x + eps * sign(d loss / d x), 0, 1) computed with autograd directly, and both
  attacks equal the torchattacks package's (test-only oracle, random_start=False) on a tiny ViT
  and a small CNN; perturbations stay in the eps ball and in [0, 1]; PGD raises the loss more.
- A cached adversarial view equals the one made on the fly by the same starting model (fp16).
- Runs: --attack-eval reports attacked accuracies no higher than the clean ones; --benchmark
  reports the cost of a view; the loop's exact adversarial training (FGSM, PGD) is more robust
  under PGD than clean training (a linear model on two-feature toy images: fast and clear-cut).
"""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

import clip_tumor
import data
from test_clip import run_args, tiny_model


def small_cnn():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, 4))
    return network.eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 64, 64, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1])


def test_fgsm_is_eps_times_the_sign_of_the_input_gradient(tiny_clip_config, batch):
    model, (images, labels) = tiny_model(tiny_clip_config), batch
    pixels = images.clone().requires_grad_(True)
    gradient, = torch.autograd.grad(F.cross_entropy(model.eval()(pixels), labels), pixels)
    expected = (images + 0.01 * gradient.sign()).clamp(0, 1)
    assert torch.equal(clip_tumor.attack(model, images, labels, 1, 0.01, 0.01), expected)


@pytest.mark.parametrize("network", ["vit", "cnn"])
def test_fgsm_and_pgd_equal_torchattacks(tiny_clip_config, batch, network):
    model = tiny_model(tiny_clip_config) if network == "vit" else small_cnn()
    images, labels = batch
    ours = clip_tumor.attack(model, images, labels, 1, 0.01, 0.01)
    theirs = torchattacks.FGSM(model, eps=0.01)(images, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours = clip_tumor.attack(model, images, labels, 7, 0.01, 0.03)
    theirs = torchattacks.PGD(model, eps=0.03, alpha=0.01, steps=7, random_start=False)(
        images, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_perturbations_stay_in_the_ball_and_pixel_range_and_pgd_is_stronger(tiny_clip_config,
                                                                            batch):
    model, (images, labels) = tiny_model(tiny_clip_config), batch
    images[0] = 0.0  # pixels at the range's ends: the clamp must act
    images[1] = 1.0
    fgsm = clip_tumor.attack(model, images, labels, 1, 0.01, 0.01)
    pgd = clip_tumor.attack(model, images, labels, 7, 0.01, 0.03)
    for adversarial, radius in ((fgsm, 0.01), (pgd, 0.03)):
        assert (adversarial - images).abs().max() <= radius + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        assert (adversarial - images).abs().max() > radius / 2  # it did move
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), labels).item() for x in (images, fgsm, pgd)]
    assert losses[0] < losses[1] < losses[2]


def test_cached_adversarial_view_equals_the_one_made_on_the_fly(tiny_clip_config, synth_dir):
    args = argparse.Namespace(model=tiny_clip_config, pretrained="none", head="mlp", seed=0,
                              benchmark=False, epochs=1, trainable_blocks=2,
                              adversarial="pgd", eps=0.01, pgd_steps=3, pgd_step_size=0.01,
                              pgd_eps=0.03)
    sample = data.load_splits(synth_dir, 0).train[0]
    path = os.path.join(synth_dir, sample.path)
    content_hash = data.file_hash(path)
    make_view, view_id = clip_tumor.adversarial_view_maker(
        args, clip_tumor.build_model, "cpu", {content_hash: sample.label})
    assert view_id.startswith("pgd-3x0.01-r0.03-")
    model = tiny_model(tiny_clip_config, head="mlp")
    cache = data.FeatureCache(os.path.join(os.path.dirname(synth_dir), "adv-cache"), model)
    data.build_cache(model, cache, {sample.path: (content_hash, [0, view_id])}, synth_dir, 4,
                     False, make_view)
    # on the fly: the starting model (zero-shot cosine head) attacks the plain view
    starting = tiny_model(tiny_clip_config, head="cosine")
    plain = data.image_view(data.load_rgb(path), content_hash, 0, 64)[None]
    adversarial = clip_tumor.attack(starting, plain, torch.tensor([sample.label]), 3, 0.01, 0.03)
    with torch.no_grad():
        expected = model.stem(adversarial)[0]
        clean = model.stem(plain)[0]
    cached = cache.read(cache.path(content_hash, view_id))
    assert torch.allclose(cached, expected, atol=2e-3, rtol=2e-3)  # fp16 entries
    assert not torch.allclose(cached, clean, atol=2e-3, rtol=2e-3)  # it is not the plain view


def test_attack_eval_reports_both_accuracies(tiny_clip_config, small_dir, tmp_path, one_thread):
    out = tmp_path / "run"
    metrics = clip_tumor.main(run_args(small_dir, tiny_clip_config, tmp_path, "--epochs", "2",
                                       "--out", str(out), "--adversarial", "fgsm",
                                       "--attack-eval", "--attack-n", "8"))
    written = json.loads((out / "metrics.json").read_text())
    for key in ("test_fgsm", "test_pgd"):
        assert written[key] == metrics[key]
        assert written[key]["n_attacked"] == 8  # 2 per class
        assert written[key]["accuracy"] <= written[key]["clean_accuracy"]
    assert written["test_fgsm"]["eps"] == 0.01 and written["test_pgd"]["eps"] == 0.03
    assert written["test_pgd"]["steps"] == 7
    config = json.loads((out / "config.json").read_text())
    assert config["adversarial_training"].startswith("fgsm, static")
    assert "under FGSM" in (out / "report.txt").read_text()


def test_benchmark_reports_the_cost_of_an_adversarial_view(tiny_clip_config, one_thread):
    result = clip_tumor.benchmark(tiny_model(tiny_clip_config), batch_size=4, repeats=1)
    assert result["fgsm_view_ms"] > 0
    assert result["pgd_view_ms_computed"] == pytest.approx(7 * result["fgsm_view_ms"], abs=0.01)


class Pixels:
    """In-memory stand-in for data.Inputs on the exact path (cache None): pixels, labels."""

    def __init__(self, model, images, labels):
        self.model, self.images, self.labels, self.cache = model, images, labels, None

    def __len__(self):
        return len(self.labels)

    def batch(self, indices, views):
        return self.images[indices]

    def logits(self, inputs):
        return self.model(inputs)


class LinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.n_classes = nn.Linear(3 * 8 * 8, 4), 4
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

    def forward(self, images):
        return self.linear(images.flatten(1) - 0.5)


def two_feature_images(n, seed):
    """(n, 3, 8, 8) noise around 0.5; each class has a robust feature (its quadrant 0.1 brighter)
    and a non-robust one (a +-0.03 pattern over every pixel, predictive but undone by eps 0.05):
    clean training leans on both, adversarial training on the robust one (Ilyas et al. 2019)."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (4, 3, 8, 8), generator=torch.Generator().manual_seed(99))
    images = 0.3 + 0.4 * torch.rand(n, 3, 8, 8, generator=generator)
    labels = torch.arange(n) % 4
    for k, label in enumerate(labels.tolist()):
        row, column = divmod(label, 2)
        images[k, :, 4 * row:4 * row + 4, 4 * column:4 * column + 4] += 0.1
        images[k] += 0.03 * (2 * patterns[label] - 1)
    return images.clamp(0, 1), labels


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_adversarial_training_in_the_loop_is_more_robust(tmp_path, method):
    """The loop's exact path (every batch attacked by the current model, trained 1:1 with it)
    gives a model more accurate under PGD than clean training does (the same seed and data)."""
    train_images, train_labels = two_feature_images(256, seed=0)
    test_images, test_labels = two_feature_images(200, seed=1)
    options = dict(lr=0.05, weight_decay=0.0, loss="ce", class_weights=False, epochs=15,
                   batch_size=32, views=1, seed=0, warmup_epochs=0, select_on="val", eps=0.05,
                   pgd_steps=5, pgd_step_size=0.02, pgd_eps=0.05)  # PGD radius = eps
    accuracy = {}
    for training in ("none", method):
        model = LinearModel()
        args = argparse.Namespace(**options, adversarial=training)
        clip_tumor.train(model, Pixels(model, train_images, train_labels),
                         Pixels(model, test_images, test_labels), args, str(tmp_path))
        clip_tumor.load_checkpoint(str(tmp_path / "best.pt"), model)
        attacked = clip_tumor.attack(model, test_images, test_labels, 5, 0.02, 0.05)
        with torch.no_grad():
            accuracy[training] = (model(attacked).argmax(-1) == test_labels).float().mean().item()
    assert accuracy[method] > accuracy["none"] + 0.2, accuracy  # measured: 0.50, 0.53 vs 0.21


@pytest.mark.parametrize("option, value", [("--eps", "-0.01"), ("--pgd-eps", "0"),
                                           ("--pgd-steps", "0"), ("--attack-n", "0")])
def test_attack_options_out_of_range_are_named(tiny_clip_config, small_dir, tmp_path, option,
                                               value):
    with pytest.raises(SystemExit, match=f"{option}"):
        clip_tumor.main(run_args(small_dir, tiny_clip_config, tmp_path, "--out",
                                 str(tmp_path / "run"), "--adversarial", "pgd", option, value))
    assert not (tmp_path / "run").exists()  # refused before anything is written
