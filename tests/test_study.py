"""Issue 14's study modes: any number of trainable blocks (0 = linear probe), a timm ViT tower
as BiomedCLIP's (tiny config, random weights), few-shot training and calibration in a run.

- For the open_clip tower and the timm tower: the CLS-only block equals the full block (1e-5),
  and for N = 0..3 trainable blocks the cached path's logits and gradients equal the full
  forward's (1e-4), with exactly the last N blocks, the final norm and projection trainable.
- --shots K: K training images per class from the training split, K validation images per class
  from the labelled images left (disjoint), seeded, counted in config.json; --val-fraction keeps
  the ordinary validation split.
- --calibrate in a run whose validation logits are a known temperature (2.5) times calibrated
  ones (test: 0.5) recovers 2.5: the fit reads validation, and finds the temperature.
"""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_tumor
import data
from conftest import assert_cached_path_equals_full_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread

# BiomedCLIP's open_clip config with a tiny timm ViT (timm's 6-block, 64-wide `test_vit`) and a
# tiny open_clip text tower (BiomedCLIP's PubMedBERT would need a download).
TINY_TIMM_CONFIG = {"embed_dim": 64,
                    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                   "timm_pool": "", "timm_proj": "linear", "image_size": 160},
                    "text_cfg": clip_tumor.TINY_CONFIG["text_cfg"]}


@pytest.fixture(scope="module")
def timm_biomedclip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "biomedclip-tiny.json"
    path.write_text(json.dumps(TINY_TIMM_CONFIG))
    return str(path)


def tiny(config, head="cosine", trainable_blocks=2):
    return clip_tumor.build_model(argparse.Namespace(
        model=config, pretrained="none", head=head, seed=0, benchmark=False, epochs=1,
        trainable_blocks=trainable_blocks))


def test_timm_tower_cls_only_block_equals_timm_block(timm_biomedclip_config):
    model = tiny(timm_biomedclip_config)
    assert model.trunk is not None and type(model.top_blocks[-1]).__module__.startswith("timm")
    tokens = torch.randn(3, 101, 64)
    block = model.top_blocks[-1]
    assert torch.allclose(clip_tumor.cls_only_block(block, tokens), block(tokens)[:, :1],
                          atol=1e-5)


def test_timm_tower_embedding_equals_open_clip_encode_image(timm_biomedclip_config):
    """Our stem + top reproduce open_clip's own image embedding of the timm tower."""
    model = tiny(timm_biomedclip_config).eval()
    images = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        theirs = F.normalize(model.visual((images - model.mean) / model.std), dim=-1)
        cls = model.trunk.blocks(model.embed(images))[:, 0]
        ours = F.normalize(model.visual.head(model.trunk.fc_norm(model.trunk.norm(cls))), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("tower", ["open_clip", "timm"])
@pytest.mark.parametrize("trainable_blocks, head", [(0, "cosine"), (0, "linear"), (1, "mlp"),
                                                    (2, "cosine"), (3, "linear")])
def test_cached_path_equals_full_forward_for_any_trainable_blocks(
        tiny_clip_config, timm_biomedclip_config, tower, trainable_blocks, head):
    config = tiny_clip_config if tower == "open_clip" else timm_biomedclip_config
    model = tiny(config, head, trainable_blocks)
    model.train()
    size = model.image_size
    images, labels = torch.rand(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    trainable_blocks_seen = {name.split(".")[3] for name, p in model.named_parameters()
                             if p.requires_grad and name.startswith(("visual.transformer.resblocks",
                                                                     "visual.trunk.blocks"))}
    assert len(trainable_blocks_seen) == trainable_blocks
    stored = assert_cached_path_equals_full_forward(model, images, labels)
    patch = 8 if tower == "open_clip" else 16
    assert stored.shape[1] == (1 if trainable_blocks == 0 else 1 + (size // patch) ** 2)


def test_few_shot_draws_are_seeded_from_training_and_validate_on_the_rest(
        tiny_clip_config, small_dir, tmp_path, monkeypatch, one_thread):
    """--shots 3 on small_dir (8 training images per class, 1 of them validating by default):
    3 training images per class from the training split, 3 validation images per class from the
    labelled images those left (disjoint), the test split untouched; the same seed draws the
    same images, another seed others; --val-fraction given keeps the ordinary validation split;
    a run trains and validates on that draw and config.json counts it."""
    parse = lambda *extra: clip_tumor.build_parser().parse_args(["--data", small_dir, *extra])
    paths = lambda samples: {s.path for s in samples}
    per_class = lambda samples: np.bincount([s.label for s in samples], minlength=4).tolist()
    ordinary = data.load_splits(small_dir, 42, 0.1)
    labelled = paths(ordinary.train + ordinary.val)
    assert all(path.startswith("Training/") for path in labelled) and len(labelled) == 32
    draw = clip_tumor.load_splits(parse("--shots", "3"))
    assert per_class(draw.train) == per_class(draw.val) == [3, 3, 3, 3]
    assert paths(draw.train) <= paths(ordinary.train)               # the training split only
    assert paths(draw.val) <= labelled - paths(draw.train)          # disjoint from training
    assert draw.test == ordinary.test
    again, other = (clip_tumor.load_splits(parse("--shots", "3", "--seed", seed))
                    for seed in ("42", "7"))
    assert (again.train, again.val) == (draw.train, draw.val)
    assert paths(other.train) != paths(draw.train) and paths(other.val) != paths(draw.val)
    quarter = data.load_splits(small_dir, 42, 0.25)                 # 2 of 8 validate
    kept = clip_tumor.load_splits(parse("--shots", "3", "--val-fraction", "0.25"))
    assert kept.val == quarter.val and per_class(kept.val) == [2, 2, 2, 2]
    assert paths(kept.train) <= paths(quarter.train) and per_class(kept.train) == [3, 3, 3, 3]

    used, original = [], clip_tumor.load_splits
    monkeypatch.setattr(clip_tumor, "load_splits", lambda args: used.append(original(args))
                        or used[-1])
    out = tmp_path / "few"
    clip_tumor.main(["--data", small_dir, "--model", tiny_clip_config, "--pretrained", "none",
                     "--views", "1", "--epochs", "1", "--shots", "3", "--trainable-blocks", "0",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert (used[0].train, used[0].val) == (draw.train, draw.val)
    counts = json.loads((out / "config.json").read_text())["counts"]
    assert counts == {"train": [3, 3, 3, 3], "val": [3, 3, 3, 3], "test": [5, 5, 5, 5]}


def test_calibration_in_a_run_recovers_a_known_temperature(tiny_clip_config, small_dir, tmp_path,
                                                           monkeypatch, one_thread):
    """--calibrate in a run whose logits are made known-miscalibrated: blocks of 5 images share
    the logits log p, p = (0.4, 0.2, 0.2, 0.2) with 2 images of p's top class and 1 of each other
    (so log p is exactly calibrated), then multiplied by 2.5 on validation and 0.5 on test. The
    fitted temperature is validation's 2.5 (1 %), the offsets 0, the NLLs those of the formula."""
    p = np.array([0.4, 0.2, 0.2, 0.2])
    temperatures = {"Training": 2.5, "Testing": 0.5}  # validation is in Training/, test not

    def miscalibrated_predict(inputs, batch_size):  # (logits, mean CE) as clip_tumor.predict
        labels = inputs.labels.numpy()
        if np.bincount(labels, minlength=4).tolist() != [5, 5, 5, 5]:  # training: 3 per class
            return original_predict(inputs, batch_size)
        logits, seen = np.zeros((len(labels), 4)), [0, 0, 0, 0]
        for k, label in enumerate(labels):  # 2 in the block of its class, 1 in each other's
            block = label if seen[label] < 2 else [c for c in range(4) if c != label][
                seen[label] - 2]
            seen[label] += 1
            logits[k] = np.roll(np.log(p), block)  # p's top class is the block's class
        logits *= temperatures[inputs.samples[0].path.split("/")[0]]
        return logits, F.cross_entropy(torch.tensor(logits), inputs.labels).item()

    original_predict = clip_tumor.predict
    monkeypatch.setattr(clip_tumor, "predict", miscalibrated_predict)
    metrics = clip_tumor.main([
        "--data", small_dir, "--model", tiny_clip_config, "--pretrained", "none", "--epochs", "0",
        "--views", "1", "--val-fraction", "0.625", "--calibrate",  # 5 of 8 validate
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    calibration = metrics["calibration"]
    assert calibration["temperature"] == pytest.approx(2.5, rel=0.01)
    assert np.allclose(list(calibration["offsets"].values()), 0, atol=1e-3)
    # NLL of a block of 5 (2 images of p's top class, 1 of each other) under softmax(scale log p)
    nll = lambda scale: -np.mean(np.log(softmax_of(scale * np.log(p))[[0, 0, 1, 2, 3]]))
    assert calibration["val_nll_before"] == pytest.approx(nll(2.5), rel=1e-9)
    assert calibration["val_nll_after"] == pytest.approx(nll(1), rel=1e-4)
    assert calibration["test_nll_before"] == pytest.approx(nll(0.5), rel=1e-9)
    assert calibration["test_nll_after"] == pytest.approx(nll(0.5 / 2.5), rel=1e-3)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"][
        "temperature"] == calibration["temperature"]


def softmax_of(logits):
    return np.exp(logits) / np.exp(logits).sum()


def test_biomedclip_style_downloaded_folder_loads_with_local_dir(tmp_path):
    """A hub model's folder (open_clip_config.json + open_clip_pytorch_model.bin), as
    `hf download microsoft/BiomedCLIP-...` writes it, loads with --model local-dir:FOLDER."""
    import open_clip
    folder = tmp_path / "BiomedCLIP-tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_TIMM_CONFIG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}))
    torch.manual_seed(3)
    reference = open_clip.model.CLIP(**TINY_TIMM_CONFIG)
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    model = tiny(f"local-dir:{folder}")
    assert model.trunk is not None and model.cache_key["weights"].startswith("file:")
    assert torch.equal(model.trunk.blocks[0].attn.qkv.weight,
                       reference.visual.trunk.blocks[0].attn.qkv.weight)


def test_demo_linear_probe_trains_as_a_probe_and_the_options_given_win():
    """--demo --trainable-blocks 0: CLIP's linear-probe recipe (the plain view, trained to
    convergence: 300 epochs at 1e-2, no warm-up; 0.07 s an epoch), unless options say otherwise."""
    parse = lambda *argv: clip_tumor.parse_args(clip_tumor.make_parser("demo"), list(argv))
    args = parse("--demo", "--trainable-blocks", "0")
    assert (args.views, args.lr, args.epochs, args.warmup_epochs) == (1, 1e-2, 300, 0)
    args = parse("--demo", "--trainable-blocks", "0", "--epochs", "5", "--views", "3")
    assert (args.views, args.lr, args.epochs) == (3, 1e-2, 5)
    args = parse("--demo")
    assert (args.views, args.lr, args.epochs) == (2, 1e-3, 20)
