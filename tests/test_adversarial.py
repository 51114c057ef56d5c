"""Issue 13: FGSM and PGD (clip_tumor.attack), adversarial training and robustness evaluation.

- FGSM equals clamp(x + eps * sign(d loss / d x), 0, 1) computed with autograd directly, and both
  attacks equal the torchattacks package's (test-only oracle, random_start=False) on a tiny ViT,
  a small CNN and the tiny BLIP (ITC and ITM heads); perturbations stay in the eps ball and in
  [0, 1]; PGD raises the loss more.
- A cached adversarial view equals the one made on the fly by the same starting model (fp16).
- Runs: --attack-eval reports attacked accuracies no higher than the clean ones, equal to
  torchattacks' on the run's model and test images; --benchmark's figures are medians after a
  warm-up round, per image, in ms (a fake clock); the loop's exact adversarial training (FGSM,
  PGD) is more robust under PGD than clean training (a linear model on two-feature toy images:
  fast and clear-cut).
"""
import argparse
import glob
import json
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

import blip_tumor
import clip_tumor
import data
import predict
from test_clip import run_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


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


def assert_equal_to_torchattacks(model, images, labels):
    """Our FGSM (eps 0.01) and PGD (7 steps of 0.01, radius 0.03) = torchattacks' (1e-6); PGD's."""
    ours = clip_tumor.attack(model, images, labels, 1, 0.01, 0.01)
    theirs = torchattacks.FGSM(model, eps=0.01)(images, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours = clip_tumor.attack(model, images, labels, 7, 0.01, 0.03)
    theirs = torchattacks.PGD(model, eps=0.03, alpha=0.01, steps=7, random_start=False)(
        images, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)
    return ours


@pytest.mark.parametrize("network", ["vit", "cnn"])
def test_fgsm_and_pgd_equal_torchattacks(tiny_clip_config, batch, network):
    assert_equal_to_torchattacks(tiny_model(tiny_clip_config) if network == "vit" else small_cnn(),
                                 *batch)


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
        args, clip_tumor.build_model, "cpu", [sample], {sample.path: content_hash})
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


def test_attack_eval_equals_torchattacks_on_the_runs_model(tiny_clip_config, small_dir,
                                                            tmp_path, one_thread):
    """--attack-eval's accuracies (all 20 test images, the attack options given) equal those of
    torchattacks' FGSM and PGD (random_start=False) on the run's best model (rebuilt by
    predict.load_run) and the test images decoded here, and its clean accuracy theirs. One
    epoch: the model is barely trained (5 of 20 right), but the attacks change answers."""
    out = tmp_path / "run"
    metrics = clip_tumor.main(run_args(small_dir, tiny_clip_config, tmp_path, "--epochs", "1",
                                       "--views", "1", "--batch-size", "4", "--attack-eval",
                                       "--eps", "0.005", "--pgd-eps", "0.01", "--pgd-step-size",
                                       "0.004", "--pgd-steps", "3", "--out", str(out)))
    model, _, _ = predict.load_run(str(out), "cpu")
    paths = sorted(glob.glob(os.path.join(small_dir, "Testing", "*", "*.jpg")))
    images = torch.stack([data.image_view(data.load_rgb(path), None, 0, 64) for path in paths])
    labels = torch.tensor([data.CLASSES.index(path.split(os.sep)[-2]) for path in paths])
    attacks = {"clean": lambda x, y: x, "fgsm": torchattacks.FGSM(model, eps=0.005),
               "pgd": torchattacks.PGD(model, eps=0.01, alpha=0.004, steps=3,
                                       random_start=False)}
    right = dict.fromkeys(attacks, 0)
    for start in range(0, 20, 4):  # the run's batches (--batch-size 4, path order)
        x, y = images[start:start + 4], labels[start:start + 4]
        for name, attack in attacks.items():
            attacked = attack(x, y)
            with torch.no_grad():
                right[name] += (model(attacked).argmax(-1) == y).sum().item()
    for name in ("fgsm", "pgd"):
        assert metrics[f"test_{name}"]["n_attacked"] == len(paths) == 20
        assert metrics[f"test_{name}"]["accuracy"] == right[name] / 20, (name, right)
        assert metrics[f"test_{name}"]["clean_accuracy"] == right["clean"] / 20
    assert right["clean"] > right["pgd"], right  # the attacks change answers (5, 4, 3 here)


@pytest.mark.parametrize("head", ["cosine", "itm"])
def test_fgsm_and_pgd_on_blip_equal_torchattacks(tiny_blip_weights, batch, head, one_thread):
    """The same attack on the tiny BLIP (transformers' BlipVisionModel, the ITC and ITM heads)."""
    model = blip_tumor.build_model(argparse.Namespace(
        weights=tiny_blip_weights, head=head, image_size=64, seed=0, benchmark=False, epochs=1,
        trainable_blocks=2))
    images, _ = batch
    ours = assert_equal_to_torchattacks(model, *batch)
    assert (ours - images).abs().max() > 0.015  # it moved beyond one step


def test_benchmark_figures_are_medians_after_warm_up_per_image(tiny_clip_config, monkeypatch,
                                                               one_thread):
    """--benchmark's accounting on a fake clock: in the warm-up round every timed call takes
    100 s, in the next three k x 1, 3, 2 s for the k-th figure (stem, naive, cached, cache read,
    FGSM view: timed in that order), so each is k x 2 s over the batch of 4, in ms; the FGSM view
    is one step of eps 0.01 in a ball of 0.01 on the batch. (pgd_view_ms_computed is pgd_steps x
    fgsm_view_ms by definition: a test of it could not fail.)"""
    names = ("stem_ms", "naive_ms", "cached_ms", "cache_read_ms", "fgsm_view_ms")
    seconds_by_round, clock = (100.0, 1.0, 3.0, 2.0), {"now": 0.0, "calls": 0}

    def perf_counter():  # calls pair up (start, end): the end of pair p advances the clock
        pair, is_end = divmod(clock["calls"], 2)
        clock["calls"] += 1
        if is_end:
            round_, k = divmod(pair, len(names))
            clock["now"] += seconds_by_round[round_] * (k + 1)
        return clock["now"]

    attacks, real_attack = [], clip_tumor.attack
    monkeypatch.setattr(clip_tumor, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(clip_tumor, "attack", lambda model, images, labels, *settings: (
        attacks.append((tuple(images.shape), labels.tolist(), settings))
        or real_attack(model, images, labels, *settings)))
    result = clip_tumor.benchmark(tiny_model(tiny_clip_config), batch_size=4, repeats=3)
    assert clock["calls"] == 2 * len(names) * 4
    assert {name for name in result if name.endswith("_ms")} == set(names)
    for k, name in enumerate(names):
        assert result[name] == pytest.approx(1000 * 2.0 * (k + 1) / 4), name
    assert result["naive_over_cached"] == round(2 / 3, 2)
    assert attacks == [((4, 3, 64, 64), [0, 1, 2, 3], (1, 0.01, 0.01))] * 4


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
