"""caption_tumor.py and the caption metrics: the scores are pycocoevalcap's, the cached decoder path
is the full forward, generation and cross-attention are transformers' own, and a tiny run learns.

- BLEU-1..4, ROUGE-L and CIDEr-D equal pycocoevalcap's (test-only oracle; pure Python, no Java
  tokenizer) to 1e-6 on fixed sentences and on a run's own captions.csv; worked examples; the
  class-accuracy rule (the class named, and no other).
- The synthetic generator's images are unchanged by captions.csv (their hash before it), and its
  captions say the class, the size and the place of the lesion box.
- Cached path (--train decoder): loss and gradients equal BlipForConditionalGeneration.forward's
  (1e-4), and that loss is the label-smoothed (0.1) next-token cross-entropy without padding.
  Each --train mode trains what it names. Generation from tokens equals BLIP's generate (greedy
  and beams); cross_attention_maps equal the decoder's on the caption cut at its class word.
- Weights that are not a captioner are refused naming the missing ones; a missing folder gives
  one line. A decoder run on a small synthetic set learns (and beats its zero-shot start); the
  run folder holds what the README says; a run without captions.csv uses class templates; a run
  killed after epoch 1 resumes to the uninterrupted run's captions and scores.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

import caption_tumor
import clip_tumor
import data
import stats
from conftest import kill_after_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread

CANDIDATES = ["axial mri slice with a large glioma on the left", "axial mri slice with no tumor",
              "a small pituitary tumor", "", "mri mri mri slice slice", "glioma"]
REFERENCES = [["axial mri slice with a large glioma in the upper left"],
              ["axial mri slice with no tumor", "a normal axial slice"],
              ["axial mri slice with a small pituitary tumor in the lower middle"],
              ["axial mri slice with no tumor"], ["mri slice"], ["glioma", "a large glioma"]]
TERMS = [caption_tumor.CLASS_TERMS[name] for name in data.CLASSES]


def pycocoevalcap_scores(candidates, references):
    gts = dict(enumerate(references))
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    return (Bleu(4).compute_score(gts, res, verbose=0)[0], Rouge().compute_score(gts, res)[0],
            Cider().compute_score(gts, res)[0])


def assert_scores_match_pycocoevalcap(candidates, references):
    bleu, rouge, cider = pycocoevalcap_scores(candidates, references)
    assert stats.bleu(candidates, references) == pytest.approx(bleu, abs=1e-6)
    assert stats.rouge_l(candidates, references) == pytest.approx(rouge, abs=1e-6)
    assert stats.cider_d(candidates, references) == pytest.approx(cider, abs=1e-6)


def test_scores_match_pycocoevalcap_on_fixed_sentences():
    """Multiple references, an empty caption, repeated words, a short caption (brevity)."""
    assert_scores_match_pycocoevalcap(CANDIDATES, REFERENCES)
    assert_scores_match_pycocoevalcap(CANDIDATES[:3], REFERENCES[:3])


def test_scores_worked_examples():
    same = ["axial mri slice with no tumor"] * 2
    assert stats.bleu(same, [[s] for s in same]) == pytest.approx([1.0] * 4)
    assert stats.rouge_l(same, [[s] for s in same]) == pytest.approx(1.0)
    # 2 of 3 words right, half of a 4-word reference: P = 2/3, R = 1/2, F(1.2) = 0.5440...
    assert stats.rouge_l(["a b x"], [["a b c d"]]) == pytest.approx(
        2.44 * (2 / 3) * 0.5 / (0.5 + 1.44 * 2 / 3))
    # BLEU-1: 2 of 3 unigrams; shorter than the reference: brevity penalty exp(1 - 4/3)
    assert stats.bleu(["a b x"], [["a b c d"]])[0] == pytest.approx(2 / 3 * 2.718281828 ** (-1 / 3))
    assert stats.caption_words("Axial MRI, a Glioma.") == "axial mri a glioma"


def test_class_accuracy_names_the_class_and_no_other():
    captions = ["axial mri slice with a large glioma on the left", "axial mri slice with no tumor",
                "a small pituitary tumor or a glioma", "a brain", "a pituitary tumor"]
    labels = [0, 2, 3, 2, 2]  # right, right, two classes named, none named, wrong class
    assert stats.caption_class_accuracy(captions, labels, TERMS) == pytest.approx(2 / 5)


def test_synthetic_images_unchanged_and_captions_describe_the_box(tmp_path):
    folder = data.write_synthetic_dataset(str(tmp_path / "d"), per_class=4, seed=0)
    digest = hashlib.sha1()
    for path in data.files_under(folder):
        if not path.endswith("captions.csv"):
            digest.update(os.path.relpath(path, folder).encode() + open(path, "rb").read())
    # the hash of this dataset (images, lesions.csv) before captions.csv existed (Pillow 11)
    assert digest.hexdigest() == "6e7bf3902bd222f3a47fb6aaa6cba41318a7585b"
    with open(os.path.join(folder, "captions.csv")) as f:
        captions = {row["path"]: row["caption"] for row in csv.DictReader(f)}
    assert len(captions) == 4 * (4 + 5)
    assert captions["Training/notumor/notumor_0000.jpg"] == "axial mri slice with no tumor"
    assert data.synth_caption("glioma", (10, 10, 40, 40)) == \
        "axial mri slice with a large glioma in the upper left"
    assert data.synth_caption("pituitary", (44, 70, 54, 80)) == \
        "axial mri slice with a small pituitary tumor in the lower middle"
    assert data.synth_caption("meningioma", (70, 40, 88, 58)) == \
        "axial mri slice with a medium meningioma on the right"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return caption_tumor.write_tiny_weights(str(tmp_path_factory.mktemp("cap") / "tiny"))


def tiny_model(weights, train="decoder"):
    return caption_tumor.build_model(argparse.Namespace(
        weights=weights, train=train, image_size=64, seed=0, benchmark=False))


def test_cached_decoder_path_equals_full_forward(tiny_weights):
    model = tiny_model(tiny_weights).eval()
    pixels = torch.rand(3, 3, 64, 64)
    ids, mask = model.tokenize(["axial mri slice with no tumor",
                                "axial mri slice with a large glioma on the left", "a glioma"])
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(pixels, ids, mask)
    full_grads = torch.autograd.grad(full, params)
    with torch.no_grad():
        tokens = model.stem(pixels)                                       # (B, 1 + 8*8, 64)
    cached = model.caption_loss(tokens, ids, mask)
    cached_grads = torch.autograd.grad(cached, params)
    assert torch.allclose(cached, full, atol=1e-4)
    assert all(torch.allclose(c, f, atol=1e-4) for c, f in zip(cached_grads, full_grads))
    # transformers' loss: next-token cross-entropy, label smoothing 0.1, padding ignored
    with torch.no_grad():
        logits = model.blip.text_decoder(input_ids=ids, attention_mask=mask,
                                         encoder_hidden_states=tokens).logits
    targets = ids.masked_fill(mask == 0, -100)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                               label_smoothing=0.1, ignore_index=-100)
    assert ids[0, 0] == model.special["bos"] and (mask == 0).any()
    assert torch.allclose(cached, expected, atol=1e-5)


def test_each_train_mode_trains_what_it_names(tiny_weights):
    for train, prefixes in (("decoder", {"text_decoder"}), ("encoder", {"vision_model"}),
                            ("full", {"text_decoder", "vision_model"})):
        model = tiny_model(tiny_weights, train)
        trained = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
        assert trained == prefixes, train


def test_generation_equals_blip_generate(tiny_weights):
    model = tiny_model(tiny_weights).eval()
    pixels = torch.rand(2, 3, 64, 64)
    for beams in (1, 2):
        ours = model.generate(model.stem(pixels), beams, 12)
        theirs = model.blip.generate(pixel_values=(pixels - model.mean) / model.std,
                                     num_beams=beams, max_length=12, no_repeat_ngram_size=3)
        assert torch.equal(ours, theirs)


def test_weights_that_are_not_a_captioner_are_refused(tiny_blip_weights, tmp_path):
    with pytest.raises(SystemExit, match="text_decoder"):
        tiny_model(tiny_blip_weights)  # an image-text retrieval BLIP: no decoder
    with pytest.raises(SystemExit, match="cannot load BLIP.*hf download"):
        tiny_model(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def decoder_run(tiny_weights, tmp_path_factory):
    """(run folder, metrics, zero-shot metrics) of a decoder run on 24 training images a class."""
    folder, threads = tmp_path_factory.mktemp("caprun"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which is set up after this one
    dataset = data.write_synthetic_dataset(str(folder / "data"), per_class=24, seed=5)
    common = ["--data", dataset, "--weights", tiny_weights, "--image-size", "64", "--beams", "1",
              "--max-length", "16", "--cache-dir", str(folder / "cache"), "--train", "decoder",
              "--batch-size", "8"]
    zero_shot = caption_tumor.main(common + ["--epochs", "0", "--out", str(folder / "zero")])
    metrics = caption_tumor.main(common + ["--epochs", "12", "--lr", "2e-3",
                                           "--out", str(folder / "run")])
    torch.set_num_threads(threads)
    return folder / "run", metrics, zero_shot


def test_decoder_run_learns_and_writes_its_folder(decoder_run):
    run, metrics, zero_shot = decoder_run
    assert metrics["test"]["class_accuracy"] >= 0.7 and metrics["test"]["bleu_4"] >= 0.4
    assert metrics["test"]["cider"] > zero_shot["test"]["cider"] + 1
    assert metrics["train_mode"] == "decoder" and metrics["cached"] and metrics["seconds_per_epoch"]
    for name in ("config.json", "metrics.json", "captions.csv", "report.txt", "curves.png",
                 "best.pt", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["args"]["script"] == "caption"


def test_run_scores_equal_pycocoevalcap_on_its_captions(decoder_run):
    run, metrics, _ = decoder_run
    with open(run / "captions.csv") as f:
        rows = list(csv.DictReader(f))
    candidates, references = [r["generated"] for r in rows], [[r["reference"]] for r in rows]
    bleu, rouge, cider = pycocoevalcap_scores(candidates, references)
    test = metrics["test"]
    assert [test[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-6)
    assert (test["rouge_l"], test["cider"]) == pytest.approx((rouge, cider), abs=1e-6)


def test_describe_and_cross_attention_maps_follow_the_run(decoder_run):
    """describe() gives the run's own test captions; each map is the cross-attention (mean over
    layers and heads, CLS dropped) of the decoder run on the caption up to the class word."""
    run, _, _ = decoder_run
    options = argparse.Namespace(**json.loads((run / "config.json").read_text())["args"])
    options.benchmark = False
    model = caption_tumor.build_model(options)
    clip_tumor.load_checkpoint(str(run / "best.pt"), model)
    with open(run / "captions.csv") as f:
        rows = list(csv.DictReader(f))[::5]
    pixels = torch.stack([data.image_view(data.load_rgb(os.path.join(options.data, r["path"])),
                                          None, 0, 64) for r in rows])
    assert caption_tumor.describe(model, pixels, options) == [r["generated"] for r in rows]
    maps, captions = caption_tumor.cross_attention_maps(model, pixels, options)
    assert maps.shape == (len(rows), 8, 8) and captions == [r["generated"] for r in rows]
    tokens = caption_tumor.run_tokens(model, pixels, options)
    ids = model.generate(tokens, 1, 16)                                   # [DEC] word word ...
    checked = 0
    for b, caption in enumerate(captions):
        words = caption.split()
        named = [words.index(w) for w in ("glioma", "meningioma", "pituitary", "no") if w in words]
        if not named:
            continue
        step = min(named)  # one token a word here: word k is ids[k + 1], generated from ids[:k + 1]
        out = model.blip.text_decoder(input_ids=ids[b:b + 1, :step + 1], output_attentions=True,
                                      encoder_hidden_states=tokens[b:b + 1])
        assert out.logits[0, -1].argmax() == ids[b, step + 1]  # this step wrote the class word
        expected = torch.stack(out.cross_attentions)[:, 0, :, -1, 1:].mean((0, 1))  # (8*8,)
        assert torch.allclose(torch.from_numpy(maps[b]).flatten(), expected, atol=1e-5)
        checked += 1
    assert checked >= len(rows) // 2


def test_a_folder_without_captions_uses_class_templates(small_dir, tiny_weights, tmp_path, capsys):
    dataset = shutil.copytree(small_dir, tmp_path / "data")
    os.remove(dataset / "captions.csv")
    metrics = caption_tumor.main(["--data", str(dataset), "--weights", tiny_weights, "--epochs",
                                  "0", "--image-size", "64", "--beams", "1", "--max-length", "8",
                                  "--train", "full", "--out", str(tmp_path / "run")])
    assert "have no caption" in capsys.readouterr().out
    with open(tmp_path / "run" / "captions.csv") as f:
        assert {r["reference"] for r in csv.DictReader(f)} == {
            data.synth_caption(name) for name in data.CLASSES}
    assert metrics["epochs"] == 0 and metrics["best_epoch"] == 0


def test_a_killed_run_resumes_to_the_same_result(small_dir, tiny_weights, tmp_path, monkeypatch):
    common = ["--data", small_dir, "--weights", tiny_weights, "--image-size", "64", "--beams",
              "1", "--max-length", "8", "--epochs", "2", "--lr", "2e-3", "--batch-size", "8",
              "--train", "decoder", "--cache-dir", str(tmp_path / "cache")]
    whole = caption_tumor.main(common + ["--out", str(tmp_path / "whole")])
    kill_after_first_checkpoint(monkeypatch, clip_tumor)
    with pytest.raises(SystemExit, match=r"stopped \(Ctrl-C\)"):
        caption_tumor.main(common + ["--out", str(tmp_path / "killed")])
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="--resume"):  # neither --resume nor --overwrite
        caption_tumor.main(common + ["--out", str(tmp_path / "killed")])
    resumed = caption_tumor.main(["--resume", str(tmp_path / "killed")])
    for split in ("train", "test"):
        assert resumed[split] == pytest.approx(whole[split], abs=1e-6)
    assert (tmp_path / "killed" / "captions.csv").read_text() == \
        (tmp_path / "whole" / "captions.csv").read_text()


def test_predict_captions_new_images_and_explains_them(decoder_run):
    """predict.py on a captioning run: the run's own test captions again (the same cached path),
    and the cross-attention maps scored by the pointing game on the synthetic lesions."""
    import predict
    run, _, _ = decoder_run
    options = json.loads((run / "config.json").read_text())["args"]
    out = predict.main([str(run), os.path.join(options["data"], "Testing"), "--out",
                        str(run.parent / "new.csv")])
    with open(out) as f:
        ours = {"Testing/" + row["path"]: row for row in csv.DictReader(f)}
    with open(run / "captions.csv") as f:
        theirs = {row["path"]: row["generated"] for row in csv.DictReader(f)}
    assert {path: row["caption"] for path, row in ours.items()} == theirs
    assert all(row["label"] == path.split("/")[1] for path, row in ours.items())
    result = predict.main([str(run), "--explain", "--n", "12", "--out", str(run.parent / "maps")])
    assert result["method"] == "cross-attention" and len(result["images"]) == 12
    from test_explain import assert_pointing_game_recomputed
    written = json.loads((run.parent / "maps" / "explain.json").read_text())
    assert_pointing_game_recomputed(written, options["data"])  # hits and chance, recomputed
    assert len(list((run.parent / "maps").glob("*.png"))) == 12


def test_options_that_mean_nothing_for_captions_are_refused(capsys):
    for option in (["--shots", "3"], ["--trainable-blocks", "0"], ["--beams", "0"]):
        with pytest.raises(SystemExit, match=f"error: {option[0]}: not for captioning"):
            caption_tumor.main(["--data", "unused", *option])
    with pytest.raises(SystemExit):
        caption_tumor.main(["--help"])
    assert "training epochs (default 15)" in " ".join(capsys.readouterr().out.split())
