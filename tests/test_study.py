"""Issue 14's study modes: any number of trainable blocks (0 = linear probe), a timm ViT tower
as BiomedCLIP's (tiny config, random weights), few-shot training and calibration in a run.

- For the open_clip tower and the timm tower: the CLS-only block equals the full block (1e-5),
  and for N = 0..3 trainable blocks the cached path's logits and gradients equal the full
  forward's (1e-4), with exactly the last N blocks, the final norm and projection trainable.
- --shots 5 trains on exactly 5 images per class; --calibrate writes the calibration section and
  never raises the validation NLL.
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import clip_tumor
from conftest import assert_cached_path_equals_full_forward

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


def test_shots_and_calibration_in_a_run(tiny_clip_config, synth_dir, tmp_path):
    out = tmp_path / "few"
    metrics = clip_tumor.main(["--data", synth_dir, "--model", tiny_clip_config, "--pretrained",
                               "none", "--views", "2", "--lr", "1e-3", "--epochs", "2",
                               "--shots", "5", "--trainable-blocks", "0", "--calibrate",
                               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["counts"]["train"] == [5, 5, 5, 5]
    calibration = metrics["calibration"]
    assert calibration["val_nll_after"] <= calibration["val_nll_before"] + 1e-9
    assert {"temperature", "threshold", "test_ece_before", "test_ece_after",
            "test_tumour_f1_before", "test_tumour_f1_after"} <= set(calibration)
    assert json.loads((out / "metrics.json").read_text())["calibration"]["temperature"] > 0


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
