"""BLIP classifier: the fast paths equal the slow ones and transformers' own, the weights are the
right ones (random-init refusal), the ITM head trains, and training works (no downloads)."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipModel

import blip_tumor
import engine

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(weights, head="cosine", image_size=64, seed=0):
    args = blip_tumor.parse_args(["--weights", weights, "--head", head, "--image-size",
                                  str(image_size), "--seed", str(seed)])
    return blip_tumor.build_model(args)


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


def test_position_embedding_interpolation(tiny_blip_weights):
    """Identity at the native size; elsewhere equal to transformers' interpolate_pos_encoding."""
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_blip_weights).eval()
    table = reference.vision_model.embeddings.position_embedding.detach()   # (1, 1 + 8*8, D)
    assert torch.equal(blip_tumor.resize_position_embedding(table, 8), table)
    model = tiny_model(tiny_blip_weights, image_size=96)                   # grid 8 -> 12
    assert model.vision.embeddings.position_embedding.shape == (1, 1 + 12 * 12, 64)
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        ours = model.embed(images)
        theirs = reference.vision_model.embeddings((images - model.mean) / model.std,
                                                   interpolate_pos_encoding=True)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert model.cache_key["image_size"] == 96


@pytest.mark.parametrize("head", ["cosine", "mlp", "itm"])
def test_cached_path_gives_same_logits_and_gradients_as_full_forward(tiny_blip_weights, head):
    model = tiny_model(tiny_blip_weights, head)
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
    assert all(g is not None for g in full_grads)  # every trainable weight is used
    for g_full, g_cached in zip(full_grads, cached_grads):
        assert torch.allclose(g_cached, g_full, atol=1e-4)


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


def test_refuses_newly_initialised_weights(tmp_path, tiny_blip_weights):
    """BlipModel's checkpoint (no text_encoder / vision_proj / itm_head under these names) and a
    retrieval checkpoint missing vision_proj are refused, listing the missing weights."""
    _, processor = blip_tumor.random_blip(BlipConfig(**blip_tumor.TINY_CONFIG))
    blip_model_dir = str(tmp_path / "blip-model")
    BlipModel(BlipConfig(**blip_tumor.TINY_CONFIG)).save_pretrained(blip_model_dir)
    processor.save_pretrained(blip_model_dir)
    for head in ("cosine", "itm"):
        with pytest.raises(SystemExit, match=r"would be randomly initialised:[\s\S]*text_encoder"):
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
    assert "2 weight(s)" in message and "vision_proj.weight" in message \
        and "vision_proj.bias" in message
    # heads that never read vision_proj may use that checkpoint; the complete one loads for all
    assert tiny_model(partial_dir, "itm").n_classes == 4
    assert tiny_model(partial_dir, "mlp").n_classes == 4
    _, _, missing = blip_tumor.load_blip(tiny_blip_weights)
    assert missing == []


def test_unavailable_weights_give_one_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(BlipForImageTextRetrieval, "from_pretrained", offline)
    with pytest.raises(SystemExit, match="hf download Salesforce/blip-itm-base-coco"):
        blip_tumor.load_blip(blip_tumor.WEIGHTS)
    with pytest.raises(SystemExit, match="no such folder"):
        blip_tumor.load_blip("./not-here")


def test_training_learns_synthetic_set_and_writes_run_folder(tiny_blip_weights, synth_dir,
                                                             tmp_path):
    out = tmp_path / "run"
    metrics = blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--out", str(out)))
    assert metrics["test"]["accuracy"] >= 0.9
    for name in ("config.json", "metrics.json", "predictions.csv", "report.txt",
                 "confusion_matrix.png", "curves.png", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert saved["model"] == "blip-tiny" and saved["epochs"] == 30


def test_zero_shot_itm_and_resume_share_the_cache(tiny_blip_weights, synth_dir, tmp_path,
                                                  monkeypatch):
    """--epochs 0 --head itm evaluates; the itm head reads the same cached stem as cosine, and a
    run stopped after epoch 1 resumes to the same result."""
    cosine, itm = tiny_model(tiny_blip_weights), tiny_model(tiny_blip_weights, "itm")
    assert cosine.cache_key == itm.cache_key
    zero_shot = blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--head", "itm",
                                         "--epochs", "0", "--out", str(tmp_path / "zs")))
    assert zero_shot["best_epoch"] == 0 and 0 <= zero_shot["test"]["accuracy"] <= 1

    whole = blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--head", "itm",
                                     "--epochs", "2", "--out", str(tmp_path / "whole")))
    original = engine.atomic_save

    def killed_after_first_epoch(obj, path):
        original(obj, path)
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1

    monkeypatch.setattr(engine, "atomic_save", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        blip_tumor.main(run_args(synth_dir, tiny_blip_weights, tmp_path, "--head", "itm",
                                 "--epochs", "2", "--out", str(tmp_path / "split")))
    monkeypatch.setattr(engine, "atomic_save", original)
    resumed = blip_tumor.main(["--resume", str(tmp_path / "split")])
    for part in ("train", "val", "test"):
        assert resumed[part]["accuracy"] == whole[part]["accuracy"]
        assert resumed[part]["loss"] == pytest.approx(whole[part]["loss"], abs=1e-6)
