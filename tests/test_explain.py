"""Explanation maps and inference on new images (issue 15).

- Hand-written Grad-CAM equals pytorch-grad-cam's GradCAM (its maps are min-max normalised and
  resized by cv2, so ours are too; 1e-4) on a CNN (resnet18, last stage) and on the tiny CLIP ViT
  (the tokens entering the last block = the output of the block before, reshaped).
- Attention probabilities equal transformers' output_attentions (BLIP) and the query-key softmax
  written out from nn.MultiheadAttention's in_proj weights (open_clip), 1e-5; rollout equals their
  product written out; a CNN has no rollout.
- The pointing game on a hand-made map, box (exclusive ends) and brain mask; the overlay draws
  the box on the right pixels.
- predict.py RUN DIR on a trained tiny run's test folder gives its predictions.csv (labels, 1e-5
  probabilities: CLIP, a CNN trained whole and one on a cached stem: each run picks its own
  script); undecodable files are listed, hidden and non-image files skipped; a damaged
  config, another class list, another stem, a folder without config.json, a killed run
  without best.pt, an empty folder and an existing CSV (without --overwrite) are refused.
- predict.py RUN --explain writes overlays and explain.json with the pointing game where lesions.csv exists;
  a second call needs --overwrite, which replaces the earlier maps and keeps the user's files;
  --out an existing folder and a lesion box outside its image are named (issue 22).
  Its pointing game and chance equal a recomputation from its records (argmax_xy, the boxes
  scaled in exact integers, grown by tolerance_pixels) and the images' brain pixels; a box that
  scales to whole pixels is not grown (floating-point scaling floored 31.999... to 31).
- The pointing game that the issue asks for: attention rollout of the trained tiny CLIP is well
  above chance on the synthetic lesions, the same model untrained (--epochs 0) is not.
"""
import argparse
import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import baselines
import blip_tumor
import clip_tumor
import predict

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny_clip(config, seed=0):
    return clip_tumor.build_model(argparse.Namespace(
        model=config, pretrained="none", head="cosine", seed=seed, benchmark=False, epochs=1,
        trainable_blocks=2)).eval()


def tiny_blip(weights):
    return blip_tumor.build_model(argparse.Namespace(
        weights=weights, image_size=64, head="cosine", seed=0, benchmark=False, epochs=1,
        trainable_blocks=2)).eval()


def small_cnn(size=128):
    return baselines.build_model(argparse.Namespace(
        model="resnet18", pretrained="none", image_size=size, seed=0, train_from=None,
        benchmark=False, no_cache=False, trainable_blocks=clip_tumor.TRAINABLE_BLOCKS,
        epochs=1)).eval()


def normalised(maps):
    maps = maps - maps.min((1, 2), keepdims=True)
    return maps / (1e-7 + maps.max((1, 2), keepdims=True))


def normalised_and_resized(maps, size):
    """As pytorch-grad-cam: each map minus its min, over its max, cv2-resized (bilinear), then
    normalised again (its aggregation over target layers rescales the resized maps)."""
    return normalised(np.stack([cv2.resize(np.float32(m), (size, size))
                                for m in normalised(maps)]))


def assert_grad_cam_equals_oracle(model, target_layer, reshape_transform=None):
    images = torch.rand(3, 3, model.image_size, model.image_size, generator=torch.Generator()
                        .manual_seed(0))
    classes = torch.tensor([0, 2, 3])
    ours = predict.grad_cam(model, images, classes)
    assert ours.shape[0] == 3 and ours.ndim == 3 and ours.max() > 0
    with GradCAM(model=model, target_layers=[target_layer],
                 reshape_transform=reshape_transform) as cam:
        theirs = cam(images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    np.testing.assert_allclose(normalised_and_resized(ours, model.image_size), theirs, atol=1e-4)


def test_grad_cam_equals_pytorch_grad_cam_on_a_cnn():
    model = small_cnn()
    assert model.explain_layer() == (model.network.layer4, "output")
    assert_grad_cam_equals_oracle(model, model.network.layer4)


def test_grad_cam_equals_pytorch_grad_cam_on_the_tiny_vit(tiny_clip_config):
    model = tiny_clip(tiny_clip_config)
    blocks = model.visual.transformer.resblocks

    def tokens_to_grid(tokens):  # (B, 1 + 8*8, D) -> (B, D, 8, 8), CLS dropped
        return tokens[:, 1:].reshape(len(tokens), 8, 8, -1).permute(0, 3, 1, 2)
    assert_grad_cam_equals_oracle(model, blocks[-2], tokens_to_grid)  # its output: our input


def test_attention_and_rollout_equal_transformers_and_multihead_attention(
        tiny_blip_weights, tiny_clip_config):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    blip = tiny_blip(tiny_blip_weights)
    with torch.no_grad():
        out = blip.vision((images - blip.mean) / blip.std, output_attentions=True,
                          output_hidden_states=True)
    layers = blip.vision.encoder.layers
    inputs = out.hidden_states[:-1]  # the embeddings, then each layer's output
    for layer, tokens, attention in zip(layers, inputs, out.attentions, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(predict.attention_probabilities(layer, tokens), attention,
                                       atol=1e-5, rtol=0)
    assert_rollout_is_the_product(blip, images, out.attentions)

    clip = tiny_clip(tiny_clip_config)
    with torch.no_grad():
        tokens, attentions = clip.embed(images), []
        for block in clip.attention_blocks():  # softmax(q k^T / sqrt(hd)) from in_proj written out
            mha, normed = block.attn, block.ln_1(tokens)
            query, keys, _ = F_linear(normed, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
            heads = lambda x: x.view(2, -1, mha.num_heads, mha.head_dim).transpose(1, 2)
            attentions.append((heads(query) @ heads(keys).transpose(-2, -1)
                               / mha.head_dim ** 0.5).softmax(-1))
            torch.testing.assert_close(predict.attention_probabilities(block, tokens),
                                       attentions[-1], atol=1e-5, rtol=0)
            tokens = block(tokens)
    assert_rollout_is_the_product(clip, images, attentions)
    with pytest.raises(SystemExit, match="no attention blocks"):
        predict.attention_rollout(small_cnn(64), images)


def F_linear(x, weight, bias):
    return x @ weight.t() + bias


def assert_rollout_is_the_product(model, images, attentions):
    """rollout = prod over blocks (last first) of rownorm(mean over heads + I); the CLS row."""
    product = torch.eye(attentions[0].shape[-1])
    for attention in attentions:
        mixed = attention.mean(1) + torch.eye(attention.shape[-1])
        product = mixed / mixed.sum(-1, keepdim=True) @ product
    expected = product[:, 0, 1:].reshape(len(images), 8, 8).numpy()
    np.testing.assert_allclose(predict.attention_rollout(model, images), expected, atol=1e-5)


def test_pointing_game_on_a_hand_made_map():
    heat = np.zeros((2, 10, 10))
    heat[0, 5, 4] = 1  # (y, x) = (5, 4): inside box x 2..4, y 3..5 (ends 5 and 6 exclusive)
    heat[1, 5, 5] = 1  # x = 5 = x1: outside, exclusive end
    box, brain = (2, 3, 5, 6), np.zeros((10, 10), bool)
    brain[:, :4] = True  # brain: columns 0..3, 40 pixels; in the box: x 2..3, y 3..5 = 6
    assert predict.pointing_game(heat, [box, box], [brain, brain], 0) == (0.5, 6 / 40)
    # tolerance 1: box x 1..5, y 2..6: both hit; brain pixels in it: x 1..3, y 2..6 = 15
    assert predict.pointing_game(heat, [box, box], [brain, brain], 1) == (1.0, 15 / 40)


def test_overlay_draws_the_box_where_it_is(tmp_path):
    """A 64-px image is drawn 4x (256 px), title band 40 px, margins 8: the box's corners land on
    the right panel's pixels 4 * (x, y) (x1, y1 exclusive); the plain panel shows the image."""
    image, heat = torch.zeros(3, 64, 64), np.zeros((64, 64))
    image[:, 10, 20] = 1.0  # one white pixel at (y, x) = (10, 20)
    predict.plot_explanation(image, heat, "t", str(tmp_path / "o.png"), box=(2, 3, 5, 6))
    png = np.asarray(Image.open(tmp_path / "o.png"))
    assert png.shape == (40 + 256 + 8, 3 * 8 + 2 * 256, 3)
    left, top = 2 * 8 + 256, 40
    assert (png[top + 12, left + 8] == 255).all() and (png[top + 23, left + 19] == 255).all()
    assert (png[top + 12, left + 20] < 255).any()  # inside the box: the map's colour
    assert (png[top + 40:top + 44, 8 + 80:8 + 84] == 255).all()  # the white pixel, 4 x 4


@pytest.fixture
def trained_run(trained_clip_run):
    """conftest.py's tiny CLIP run on synth_dir (12 epochs, cached)."""
    return str(trained_clip_run[0])


def read_rows(path):
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_predict_reproduces_the_runs_predictions(trained_run, synth_dir, tmp_path, capsys):
    out = str(tmp_path / "preds.csv")
    predict.main([trained_run, os.path.join(synth_dir, "Testing"), "--out", out])
    ours, theirs = read_rows(out), read_rows(os.path.join(trained_run, "predictions.csv"))
    assert {"Testing/" + path for path in ours} == set(theirs)
    for path, row in ours.items():
        expected = theirs["Testing/" + path]
        assert (row["label"], row["pred"]) == (expected["label"], expected["pred"])
        for name in clip_tumor.data.CLASSES:
            assert abs(float(row[f"p_{name}"]) - float(expected[f"p_{name}"])) <= 1e-5
    assert "accuracy" in capsys.readouterr().out

    folder = tmp_path / "new"  # no class folders: no label column; odd files
    (folder / "scans").mkdir(parents=True)
    shutil.copy(os.path.join(synth_dir, "Testing", "glioma", "glioma_0000.jpg"), folder / "a.jpg")
    (folder / "scans" / "broken.png").write_bytes(b"not an image")
    (folder / ".hidden.jpg").write_bytes(b"hidden")
    (folder / "notes.txt").write_text("ignored")
    predict.main([trained_run, str(folder)])
    written = os.path.join(trained_run, "predictions_new.csv")
    with pytest.raises(SystemExit, match="predictions_new.csv: exists; pass --overwrite"):
        predict.main([trained_run, str(folder)])
    rows = read_rows(written)
    assert set(rows) == {"a.jpg", "scans/broken.png"} and "label" not in rows["a.jpg"]
    assert rows["scans/broken.png"]["pred"] == "undecodable"
    assert "broken.png" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--train-from", "layer3"]])  # full network; cached stem
def test_cnn_predict_reproduces_the_runs_predictions(extra, small_dir, tmp_path):
    run = str(tmp_path / "cnn")
    metrics = baselines.main(["--data", small_dir, "--model", "test_resnet", "--pretrained",
                              "none", "--image-size", "64", "--views", "1", "--epochs", "1",
                              "--cache-dir", str(tmp_path / "cache"), "--out", run, *extra])
    assert metrics["cached"] == bool(extra)
    predict.main([run, os.path.join(small_dir, "Testing")])
    ours = read_rows(os.path.join(run, "predictions_Testing.csv"))
    theirs = read_rows(os.path.join(run, "predictions.csv"))
    assert {"Testing/" + path for path in ours} == set(theirs)
    for path, row in ours.items():
        assert row["pred"] == theirs["Testing/" + path]["pred"]
        for name in clip_tumor.data.CLASSES:
            assert abs(float(row[f"p_{name}"]) - float(theirs["Testing/" + path][f"p_{name}"])
                       ) <= 1e-5


def test_predict_refuses_a_damaged_run_or_another_class_list(trained_run, synth_dir, tmp_path):
    images = os.path.join(synth_dir, "Testing")
    with pytest.raises(SystemExit, match="config.json: no such file; pass a run folder"):
        predict.main([str(tmp_path), images])
    (tmp_path / "config.json").write_text('{"args": {"seed": 1}}')  # not a training script's
    with pytest.raises(SystemExit, match="config.json: cannot read the run's options"):
        predict.main([str(tmp_path), images])
    os.remove(tmp_path / "config.json")
    shutil.copytree(trained_run, tmp_path / "killed")  # stopped before its first epoch ended
    os.remove(tmp_path / "killed" / "best.pt")
    with pytest.raises(SystemExit, match="best.pt: not found.*--resume"):
        predict.main([str(tmp_path / "killed"), images])
    with pytest.raises(SystemExit, match="give IMAGES_DIR .* or --explain"):
        predict.main([trained_run])
    for moved in (["--predict", images, "--run", trained_run], ["--explain", trained_run]):
        with pytest.raises(SystemExit, match=f"{moved[0]} moved to predict.py"):
            clip_tumor.main(moved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files in it"):
        predict.main([trained_run, str(tmp_path / "empty")])
    for key, change in (("classes", ["glioma", "meningioma", "notumor", "other"]),
                        ("model_key", "frozen_digest")):
        copy = tmp_path / key
        shutil.copytree(trained_run, copy)
        config = json.loads((copy / "config.json").read_text())
        if key == "classes":
            config["classes"] = change
        else:
            config["model_key"][change] = "0" * 40
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(SystemExit, match=f"{change[-1] if key == 'classes' else change}"):
            predict.main([str(copy), images])


def test_explain_writes_overlays_and_the_pointing_game(trained_run):
    result = predict.main([trained_run, "--explain", "--n", "4", "--method", "gradcam"])
    folder = os.path.join(trained_run, "explain")
    assert len([name for name in os.listdir(folder) if name.endswith(".png")]) == 4
    with open(os.path.join(folder, "explain.json")) as f:
        written = json.load(f)
    assert written["method"] == "gradcam" and len(written["images"]) == 4
    assert_pointing_game_recomputed(written, json.load(open(os.path.join(trained_run,
                                                                   "config.json")))["args"]["data"])
    assert result["pointing_game"] == written["pointing_game"]
    with open(os.path.join(folder, "mine.txt"), "w") as f:  # a user's file in the folder
        f.write("notes")
    with pytest.raises(SystemExit, match="explain.json: exists; pass --overwrite"):
        predict.main([trained_run, "--explain", "--n", "2"])
    predict.main([trained_run, "--explain", "--n", "2", "--overwrite"])
    assert sorted(name for name in os.listdir(folder) if not name.endswith(".png")) == [
        "explain.json", "mine.txt"]  # the earlier maps replaced, the user's file kept
    assert len([name for name in os.listdir(folder) if name.endswith(".png")]) == 2
    with open(os.path.join(folder, "explain.json"), "w") as f:
        f.write("{")  # damaged: which maps it wrote is unknown, so nothing is removed
    with pytest.raises(SystemExit, match="explain.json: cannot read which maps it wrote"):
        predict.main([trained_run, "--explain", "--n", "2", "--overwrite"])
    assert len([name for name in os.listdir(folder) if name.endswith(".png")]) == 2


def test_predict_out_a_folder_and_boxes_outside_the_image_are_named(trained_run, synth_dir,
                                                                    tmp_path, capsys):
    """Issue 22: --out an existing folder said "free disk space"; a lesion box outside its image
    was scored, rows matching no image were dropped without a count."""
    with pytest.raises(SystemExit, match="--out .*: is a folder; pass a file name"):
        predict.main([trained_run, os.path.join(synth_dir, "Testing"), "--out", str(tmp_path)])
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("glioma_0000.jpg", "glioma_0001.jpg"):
        shutil.copy(os.path.join(synth_dir, "Testing", "glioma", name), scans / name)
    lesions = scans / "lesions.csv"
    lesions.write_text("path,x0,y0,x1,y1\nglioma_0000.jpg,10,10,40,40\n"
                       "/abs/glioma_0001.jpg,1,1,5,5\n")  # an absolute path matches no image
    predict.main([trained_run, "--explain", "--images", str(scans), "--out", str(tmp_path / "e")])
    assert f"lesions: 1 of the 2 images have a box in {lesions}" in capsys.readouterr().out
    lesions.write_text("path,x0,y0,x1,y1\nglioma_0000.jpg,10,10,40,40\nglioma_0001.jpg,50,0,97,9\n")
    with pytest.raises(SystemExit, match=r"lesions.csv:3: box \(50, 0, 97, 9\) lies outside "
                                         r"glioma_0001.jpg \(96 x 96\)"):
        predict.main([trained_run, "--explain", "--images", str(scans), "--out",
                      str(tmp_path / "f")])


def test_trained_attention_finds_the_lesions_and_untrained_does_not(trained_clip_run, synth_dir,
                                                                    tiny_clip_config, tmp_path):
    """Rollout's pointing game on all 30 tumour test images of synth_dir: the trained tiny CLIP
    well above chance, the same model before training (--epochs 0, same seed) not. The scalp,
    the images' brightest tissue, is what makes the second half hold (data.synth_image)."""
    trained = str(trained_clip_run[0])
    clip_tumor.main(["--data", synth_dir, "--model", tiny_clip_config, "--pretrained", "none",
                     "--views", "1", "--epochs", "0", "--out", str(tmp_path / "untrained"),
                     "--cache-dir", os.path.join(os.path.dirname(trained), "cache")])
    above_chance = {}
    for name, run in (("trained", trained), ("untrained", str(tmp_path / "untrained"))):
        result = predict.main([run, "--explain", "--n", "100", "--out", str(tmp_path / name)])
        assert result["method"] == "rollout"  # a ViT's default
        assert_pointing_game_recomputed(json.loads((tmp_path / name / "explain.json")
                                                   .read_text()), synth_dir)
        assert result["n_scored"] == 30 and 0.1 < result["chance"] < 0.3
        above_chance[name] = result["pointing_game"] - result["chance"]
    assert above_chance["trained"] >= 0.5 and above_chance["untrained"] <= 0.2, above_chance


def assert_pointing_game_recomputed(written, root):
    """explain.json's pointing game and chance, recomputed from its records and the images: each
    box is lesions.csv's scaled to the model's input in exact integers (x0, y0 down, x1, y1 up),
    a hit is argmax_xy in the box grown by tolerance_pixels, chance the share of the plain view's
    brain pixels (grey > brain_threshold) in that grown box; images without a box are unscored."""
    with open(os.path.join(root, "lesions.csv"), newline="") as f:
        lesions = {row["path"]: [int(row[k]) for k in ("x0", "y0", "x1", "y1")]
                   for row in csv.DictReader(f)}
    size, grow = written["image_size"], written["tolerance_pixels"]
    hits, chances = [], []
    for record in written["images"]:
        if record["path"] not in lesions:
            assert record["box"] is None, record
            continue
        image = Image.open(os.path.join(root, record["path"])).convert("RGB")
        (x0, y0, x1, y1), (width, height) = lesions[record["path"]], image.size
        box = [x0 * size // width, y0 * size // height, -(-x1 * size // width),
               -(-y1 * size // height)]
        assert record["box"] == box, (record, box)
        x, y = record["argmax_xy"]
        hits.append(box[0] - grow <= x < box[2] + grow and box[1] - grow <= y < box[3] + grow)
        grey = np.asarray(image.resize((size, size), Image.BICUBIC), np.float64).mean(2) / 255
        rows, cols = np.indices(grey.shape)
        grown = ((cols >= box[0] - grow) & (cols < box[2] + grow) & (rows >= box[1] - grow)
                 & (rows < box[3] + grow))
        chances.append(grown[grey > written["brain_threshold"]].mean())
    assert written["n_scored"] == len(hits) > 0
    assert written["pointing_game"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert written["chance"] == pytest.approx(np.mean(chances), abs=1e-9)


def test_a_box_that_scales_to_whole_pixels_is_not_grown(trained_run, synth_dir, tmp_path):
    """A 98-px image with the box (49, 49, 60, 60): at the model's 64 px its x0, y0 are 49 x 64 /
    98 = 32 exactly, so the scored box is (32, 32, 40, 40), not a pixel wider."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(os.path.join(synth_dir, "Testing", "glioma", "glioma_0000.jpg")).resize(
        (98, 98)).save(folder / "a.png")
    (folder / "lesions.csv").write_text("path,x0,y0,x1,y1\na.png,49,49,60,60\n")
    result = predict.main([trained_run, "--explain", "--images", str(folder), "--out",
                           str(tmp_path / "maps")])
    assert list(result["images"][0]["box"]) == [32, 32, 40, 40]


def test_lesion_boxes_are_read_and_bad_rows_named(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("path,x0,y0,x1,y1\nTesting/glioma/a.jpg,1,2,5,6\n")
    assert read_boxes(good) == {"Testing/glioma/a.jpg": (1, 2, 5, 6)}
    for text, problem in (("path,x0,y0,x1,y1\na.jpg,1,2,5,6\nb.jpg,3,3,3,4\n", ":3: ValueError"),
                          ("path,x0,y0\na.jpg,1,2\n", ":2: KeyError"),
                          ("path,x0,y0,x1,y1\na.jpg,1,2,5,6\na.jpg,1,2,5,6\n", ":3: Value"),
                          ("path,x0,y0,x1,y1\na.jpg,1,2,x,6\n", ":2: ValueError")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(SystemExit, match=f"bad.csv{problem}"):
            read_boxes(bad)
    with pytest.raises(SystemExit, match="missing.csv:1: FileNotFoundError"):
        read_boxes(tmp_path / "missing.csv")


def read_boxes(path):
    return predict.read_lesion_boxes(str(path))
