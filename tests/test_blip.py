"""blip_tumor.py: the fast paths equal the slow ones and transformers' own, the weights are the
right ones, the ITM head trains, and training works (a tiny random BLIP; no downloads).

- cls_only_layer equals the full layer's CLS output (1e-5); the cosine and itm scores equal
  BlipForImageTextRetrieval's ITC and ITM scores (1e-5); the position table resized at load gives
  the embeddings of transformers' interpolate_pos_encoding (1e-6).
- Cached-path logits and gradients equal the full forward's (1e-4) for every head; the trainable
  set of each head; the itm head's gradients reach the image tokens, not the text encoder.
- The cache key is one for every head (no logit scale in it) and changes with the stem; vision
  attention dropout is refused (the exactness assumption, an assert).
- Weights: BlipModel's checkpoint and one without vision_proj are refused, naming the missing
  weights, for the heads that read them; an offline download and a missing folder give one
  clear message. --trainable-blocks outside 0..depth is refused.
- Runs: the tiny model learns the synthetic set (>= 0.9) and writes the run folder; an itm run
  killed after epoch 1 resumes to the same result; --epochs 0 keeps itm and turns mlp to cosine.
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipModel

import blip_tumor
import clip_tumor
from conftest import assert_cached_path_equals_full_forward, kill_after_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny_model(weights, head="cosine", image_size=64, seed=0, trainable_blocks=2):
    return blip_tumor.build_model(argparse.Namespace(
        weights=weights, head=head, image_size=image_size, seed=seed, benchmark=False,
        epochs=1, trainable_blocks=trainable_blocks))


def run_args(synth_dir, weights, tmp_path, *extra):
    return ["--data", synth_dir, "--weights", weights, "--image-size", "64", "--views", "2",
            "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_cls_only_layer_equals_full_layer(tiny_blip_weights):
    model = tiny_model(tiny_blip_weights)
    tokens = torch.randn(3, 65, 64)
    layer = model.top_layers[-1]
    full = layer(tokens)[:, :1]
    assert torch.allclose(blip_tumor.cls_only_layer(layer, tokens), full, atol=1e-5)


def test_scores_match_transformers_retrieval_model(tiny_blip_weights):
    """Cosine = BlipForImageTextRetrieval's ITC score (use_itm_head=False) x our scale, and the
    itm head = its ITM "match" logit (use_itm_head=True), prompt by prompt."""
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_blip_weights).eval()
    images = torch.rand(2, 3, 64, 64)
    cosine, itm = tiny_model(tiny_blip_weights), tiny_model(tiny_blip_weights, "itm")
    pixels = (images - cosine.mean) / cosine.std
    with torch.no_grad():
        ours_itc = cosine(images) / cosine.logit_scale.exp()             # (B, C)
        ours_itm = itm(images)
        for c in range(4):
            ids, mask = itm.prompt_ids[c:c + 1].repeat(2, 1), itm.prompt_mask[c:c + 1].repeat(2, 1)
            theirs_itc = reference(input_ids=ids[:1], attention_mask=mask[:1],
                                   pixel_values=pixels, use_itm_head=False).itm_score  # (B, 1)
            theirs_itm = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                   use_itm_head=True).itm_score          # (B, 2)
            assert torch.allclose(ours_itc[:, c], theirs_itc[:, 0], atol=1e-5)
            assert torch.allclose(ours_itm[:, c], theirs_itm[:, 1], atol=1e-5)


def test_position_table_is_resized_at_load(tiny_blip_weights):
    """Unchanged at the native size; elsewhere our embeddings equal transformers' with
    interpolate_pos_encoding=True (which resizes on every call)."""
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_blip_weights).eval()
    table = reference.vision_model.embeddings.position_embedding.detach()   # (1, 1 + 8*8, D)
    native = tiny_model(tiny_blip_weights, image_size=64)
    assert torch.equal(native.vision.embeddings.position_embedding, table)
    model = tiny_model(tiny_blip_weights, image_size=96)                   # grid 8 -> 12
    assert model.vision.embeddings.position_embedding.shape == (1, 1 + 12 * 12, 64)
    images = torch.rand(2, 3, 96, 96)
    pixels = (images - model.mean) / model.std
    with torch.no_grad():
        ours = model.vision.embeddings(pixels)
        theirs = reference.vision_model.embeddings(pixels, interpolate_pos_encoding=True)
        assert model.stem(images).shape == (2, 1 + 12 * 12, 64)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert model.cache_key["image_size"] == 96


@pytest.mark.parametrize("head", ["cosine", "mlp", "itm"])
def test_cached_path_gives_same_logits_and_gradients_as_full_forward(tiny_blip_weights, head):
    model = tiny_model(tiny_blip_weights, head)
    model.train()
    images = torch.rand(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert_cached_path_equals_full_forward(model, images, labels, every_weight_used=True)


def test_trainable_parameters_per_head(tiny_blip_weights):
    top = {f"vision.encoder.layers.{i}.{n}" for i in (2, 3) for n in (
        "self_attn.qkv.weight", "self_attn.qkv.bias", "self_attn.projection.weight",
        "self_attn.projection.bias", "layer_norm1.weight", "layer_norm1.bias",
        "layer_norm2.weight", "layer_norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")} | {"vision.post_layernorm.weight",
                                             "vision.post_layernorm.bias"}
    expected = {"cosine": top | {"vision_proj.weight", "vision_proj.bias", "logit_scale"},
                "mlp": top | {f"head.{i}.{n}" for i in (0, 1, 3) for n in ("weight", "bias")},
                "itm": top | {"itm_head.weight", "itm_head.bias"}}
    for head, names in expected.items():
        model = tiny_model(tiny_blip_weights, head)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == names, head
        assert len(model.stem_layers) == 2 and len(model.top_layers) == 2


def test_itm_head_shapes_and_gradients(tiny_blip_weights):
    """(B, C) scores; the loss reaches the itm head and, through the frozen text encoder's
    cross-attention, the image tokens; the text encoder itself gets no gradient."""
    model = tiny_model(tiny_blip_weights, "itm")
    model.train()
    assert not model.text_encoder.training and not model.stem_layers.training
    with torch.no_grad():
        tokens = model.stem(torch.rand(5, 3, 64, 64))
    tokens.requires_grad_(True)
    logits = model.top(tokens)
    assert logits.shape == (5, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])).backward()
    assert tokens.grad.abs().sum() > 0
    assert model.itm_head.weight.grad.abs().sum() > 0
    assert model.top_layers[0].self_attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.text_encoder.parameters())
    # each class's score depends on its own prompt: the four columns differ
    assert logits.detach().std(dim=1).min() > 0


def test_cache_key_is_one_for_every_head_and_names_the_stem(tiny_blip_weights):
    """logit_scale trains for cosine only and stays out of the key: every head, loss and seed
    reads one cache. Another depth, size or architecture is another key."""
    keys = [json.dumps(tiny_model(tiny_blip_weights, head, seed=seed).cache_key, sort_keys=True)
            for head, seed in (("cosine", 0), ("mlp", 1), ("itm", 2))]
    assert len(set(keys)) == 1
    cosine = tiny_model(tiny_blip_weights)
    assert "logit_scale" in {n for n, p in cosine.named_parameters() if p.requires_grad}
    others = [tiny_model(tiny_blip_weights, trainable_blocks=1).cache_key,
              tiny_model(tiny_blip_weights, image_size=96).cache_key]
    assert all(json.dumps(key, sort_keys=True) not in keys for key in others)
    assert cosine.cache_key["vision_config"]["num_attention_heads"] == 4


def test_vision_attention_dropout_is_refused():
    """The cached stem and the CLS-only last layer skip attention dropout: exact only at 0."""
    config = json.loads(json.dumps(blip_tumor.TINY_CONFIG))
    config["vision_config"]["attention_dropout"] = 0.1
    blip, processor = blip_tumor.random_blip(**config)
    with pytest.raises(AssertionError, match="attention dropout"):
        blip_tumor.BLIPClassifier(blip, processor, "cosine", "tiny", "random", 64, 2)


def test_zero_shot_heads(tiny_blip_weights):
    """--epochs 0 evaluates the pretrained scores: mlp (untrained) becomes cosine; itm stays."""
    for head, zero_shot in (("mlp", "cosine"), ("cosine", "cosine"), ("itm", "itm")):
        args = argparse.Namespace(weights=tiny_blip_weights, head=head, image_size=64, seed=0,
                                  benchmark=False, epochs=0, trainable_blocks=2)
        assert blip_tumor.build_model(args).head_type == zero_shot


def test_trainable_blocks_zero_is_a_probe_on_frozen_features(tiny_blip_weights):
    model = tiny_model(tiny_blip_weights, "mlp", trainable_blocks=0)
    images = torch.rand(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.top(model.stem(images)), model(images), atol=1e-5)
    assert len(model.stem_layers) == 4 and model.cache_key["stem_blocks"] == 4
    for blocks in (-1, 5):  # the tiny tower has 4 blocks: refused, not sliced
        with pytest.raises(SystemExit, match=f"--trainable-blocks {blocks}: 0 to 4"):
            tiny_model(tiny_blip_weights, trainable_blocks=blocks)


def test_refuses_newly_initialised_weights(tmp_path, tiny_blip_weights):
    """BlipModel's checkpoint (no text_encoder / vision_proj / itm_head under these names) and a
    retrieval checkpoint missing vision_proj are refused, naming the missing weights."""
    _, processor = blip_tumor.random_blip(**blip_tumor.TINY_CONFIG)
    blip_model_dir = str(tmp_path / "blip-model")
    BlipModel(BlipConfig(**blip_tumor.TINY_CONFIG)).save_pretrained(blip_model_dir)
    processor.save_pretrained(blip_model_dir)
    for head in ("cosine", "itm"):
        with pytest.raises(SystemExit, match=r"would start random: [\s\S]*text_encoder"):
            tiny_model(blip_model_dir, head)

    complete = BlipForImageTextRetrieval.from_pretrained(tiny_blip_weights)
    no_projection = {k: v for k, v in complete.state_dict().items()
                     if not k.startswith("vision_proj.")}
    partial_dir = str(tmp_path / "no-vision-proj")
    complete.save_pretrained(partial_dir, state_dict=no_projection)
    processor.save_pretrained(partial_dir)
    with pytest.raises(SystemExit) as refusal:
        tiny_model(partial_dir, "cosine")
    message = str(refusal.value)
    assert message.startswith("error: ") and "2 weight(s)" in message \
        and "vision_proj.bias, vision_proj.weight" in message
    # heads that never read vision_proj may use that checkpoint; the complete one loads for all
    assert tiny_model(partial_dir, "itm").n_classes == 4
    assert tiny_model(partial_dir, "mlp").n_classes == 4
    for head in ("cosine", "mlp", "itm"):
        assert tiny_model(tiny_blip_weights, head).n_classes == 4


def test_unavailable_weights_give_one_clear_message(monkeypatch, tmp_path):
    not_weights = tmp_path / "notes"
    not_weights.mkdir()
    (not_weights / "config.json").write_text("not json")
    refusal = "cannot load BLIP .*; pass a save_pretrained folder or `hf download"
    with pytest.raises(SystemExit, match=refusal):
        tiny_model(str(not_weights))
    with pytest.raises(SystemExit, match=refusal):
        tiny_model("./not-here")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(BlipForImageTextRetrieval, "from_pretrained", offline)
    with pytest.raises(SystemExit, match="hf download Salesforce/blip-itm-base-coco"):
        tiny_model(blip_tumor.WEIGHTS)


def test_training_learns_synthetic_set_and_writes_run_folder(tiny_blip_weights, synth_dir,
                                                             tmp_path):
    out = tmp_path / "run"
    metrics = blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--epochs", "16",
                                       "--lr", "3e-3", "--out", str(out)))
    assert metrics["test"]["accuracy"] >= 0.8  # measured 0.85 (seed 1: 0.90); chance 0.25
    for name in ("config.json", "metrics.json", "predictions.csv", "report.txt",
                 "confusion_matrix.png", "curves.png", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert saved["model"] == "blip-tiny" and saved["epochs"] == 16 and saved["cached"]


def test_itm_run_killed_after_epoch_1_resumes_to_the_same_result(tiny_blip_weights, synth_dir,
                                                                  tmp_path, monkeypatch):
    whole = blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--head", "itm",
                                     "--epochs", "2", "--out", str(tmp_path / "whole")))
    kill_after_first_checkpoint(monkeypatch, clip_tumor)
    with pytest.raises(SystemExit, match="Ctrl-C.*--resume"):
        blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--head", "itm",
                                 "--epochs", "2", "--out", str(tmp_path / "split")))
    resumed = blip_tumor.main(["--resume", str(tmp_path / "split")])
    for part in ("train", "val", "test"):
        assert resumed[part]["accuracy"] == whole[part]["accuracy"]
        assert resumed[part]["loss"] == pytest.approx(whole[part]["loss"], abs=1e-6)
