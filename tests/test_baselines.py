"""baselines.py: the stage split equals timm's forward, frozen stages stay frozen, the paper's
names are torchvision's architectures, weights load or fail clearly, training works.
From-scratch weights only: nothing is downloaded.

- Cached-path logits and gradients equal the full forward's (1e-4) for ResNet, DenseNet and
  Xception; the split with the 1000-class layer kept equals timm's own forward (1e-5).
- resnet50 and densenet121 load torchvision's state dicts and then give torchvision's features
  (1e-5): the timm weights named in the README are torchvision's, in the same architecture.
- Frozen BatchNorm statistics do not change in training; full fine-tuning trains everything and
  caches nothing; the cache key names the stem (stages, weights).
- Clear errors: an unknown stage (listing the stages) or model, --trainable-blocks (the ViTs'
  option) other than its default, a weights file of another architecture, a file that is not
  weights at all (text, JPEG), an offline download, a stage split that is not timm's forward.
- Runs (timm's 0.4 M-parameter test_resnet): `--demo --out X --epochs 5 ...` uses every option
  given, learns the synthetic set (>= 0.9, full fine-tuning) and writes X/ with epochs 5 in
  metrics.json; a --train-from run killed after epoch 1 resumes to the same result.
"""
import argparse
import json
import urllib.error

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import baselines
import clip_tumor
from conftest import kill_after_first_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def small_model(name="resnet18", train_from=None, size=64, seed=0, pretrained="none",
                trainable_blocks=clip_tumor.TRAINABLE_BLOCKS):
    args = argparse.Namespace(model=name, pretrained=pretrained, image_size=size, seed=seed,
                              train_from=train_from, benchmark=False, no_cache=False,
                              trainable_blocks=trainable_blocks, epochs=1)
    return baselines.build_model(args), args


def run_args(synth_dir, tmp_path, *extra):
    return ["--data", synth_dir, "--model", "test_resnet", "--pretrained", "none",
            "--image-size", "64", "--views", "2", "--lr", "3e-3",
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("name, train_from, first_stages, classifier", [
    ("resnet18", "layer3", ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2"], "fc"),
    ("densenet121", "features.denseblock4", ["features.conv0", "features.norm0",
                                             "features.pool0", "features.denseblock1"],
     "classifier"),
    ("xception", "block12", ["conv1", "bn1", "act1", "conv2", "bn2", "act2", "block1"], "fc"),
])
def test_cached_path_gives_same_logits_and_gradients_as_full_forward(name, train_from,
                                                                     first_stages, classifier):
    model, args = small_model(name, train_from)
    stem_names = [n for n, _ in model.frozen_stages]
    assert stem_names[:len(first_stages)] == first_stages and stem_names[-1] != train_from
    assert model.trainable_stages[0][0] == train_from and not args.no_cache
    assert model.network.get_submodule(classifier).out_features == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"network.{classifier}.weight" in trainable
    assert not any(p.requires_grad for _, stage in model.frozen_stages
                   for p in stage.parameters())

    model.train()  # BatchNorm of the trainable stages uses batch statistics in both paths
    images = torch.rand(4, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 3])
    params = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads(forward):
        logits = forward()
        return logits.detach(), torch.autograd.grad(F.cross_entropy(logits, labels), params)

    full_logits, full_grads = logits_and_grads(lambda: model(images))
    model.eval()  # the cache is built in eval mode (data.build_cache), training is not
    with torch.no_grad():
        features = model.stem(images)
    model.train()
    cached_logits, cached_grads = logits_and_grads(lambda: model.top(features))
    assert torch.allclose(cached_logits, full_logits, atol=1e-4)
    for g_full, g_cached in zip(full_grads, cached_grads):
        assert torch.allclose(g_cached, g_full, atol=1e-4)


def test_split_reproduces_timm_forward_exactly():
    """Our stem + top with the 1000-class layer kept equals timm's resnet18 itself."""
    torch.manual_seed(0)
    reference = timm.create_model("resnet18").eval()
    model = baselines.CNNClassifier(reference, "layer4", "resnet18", "none", 64).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        theirs = reference((images - model.mean) / model.std)
        ours = model.top(model.stem(images))
    assert ours.shape == (2, 1000) and torch.allclose(ours, theirs, atol=1e-5)
    assert model.stem(images).shape == (2, 256, 4, 4)  # layer3's output at 64 px: stride 16


@pytest.mark.parametrize("name, torchvision_name", [("resnet50", "resnet50"),
                                                    ("densenet121", "densenet121")])
def test_paper_names_are_torchvisions_architectures(name, torchvision_name):
    """timm's tv*_in1k weights are torchvision's: the same keys, shapes and features."""
    torch.manual_seed(0)
    ours = timm.create_model(baselines.PAPER_MODELS[name], pretrained=False).eval()
    theirs = torchvision.models.get_model(torchvision_name).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every key and shape matches
    ours.reset_classifier(0)                    # both return pooled features now
    setattr(theirs, "fc" if name == "resnet50" else "classifier", torch.nn.Identity())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(images), theirs(images), atol=1e-5)
    # timm's "tv" tags are torchvision's weights; resnet50's is torchvision's own default file
    config = ours.pretrained_cfg
    assert config["tag"].startswith("tv") and config["mean"] == (0.485, 0.456, 0.406)
    if name == "resnet50":
        assert config["url"] == torchvision.models.ResNet50_Weights.DEFAULT.url


def test_frozen_batchnorm_statistics_do_not_change_in_training():
    model, _ = small_model("resnet18", "layer4")
    frozen_mean = model.network.layer3[0].bn1.running_mean.clone()
    trainable_mean = model.network.layer4[0].bn1.running_mean.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()  # what clip_tumor.train does every epoch
    assert not model.network.layer3.training and model.network.layer4.training
    loss = F.cross_entropy(model(torch.rand(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.equal(model.network.layer3[0].bn1.running_mean, frozen_mean)
    assert not torch.equal(model.network.layer4[0].bn1.running_mean, trainable_mean)


def test_full_fine_tuning_trains_everything_and_caches_nothing():
    model, args = small_model("resnet18")
    assert args.no_cache and model.frozen_stages == []
    assert all(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.top(model.stem(images)), model(images), atol=1e-6)


def test_cache_key_names_the_stem():
    a, _ = small_model("resnet18", "layer4", seed=0)
    b, _ = small_model("resnet18", "layer3", seed=0)
    c, _ = small_model("resnet18", "layer4", seed=1)
    assert a.cache_key["stem_stages"][-1] == "layer3" and b.cache_key["stem_stages"][-1] == "layer2"
    assert "BasicBlock" in a.cache_key["architecture"]  # the frozen modules, printed
    assert a.cache_key["architecture"] != b.cache_key["architecture"]
    assert a.cache_key["frozen_digest"] != c.cache_key["frozen_digest"]  # other random weights
    assert len({json.dumps(m.cache_key, sort_keys=True) for m in (a, b, c)}) == 3


def test_stages_that_do_not_chain_to_timms_forward_are_refused(monkeypatch):
    """A model whose forward does more than chain its stages (here: features doubled)."""
    features = timm.models.resnet.ResNet.forward_features
    monkeypatch.setattr(timm.models.resnet.ResNet, "forward_features",
                        lambda self, x: 2 * features(self, x))
    with pytest.raises(SystemExit, match="--train-from layer4: resnet18's forward is not the"):
        small_model("resnet18", "layer4")
    assert small_model("resnet18")[1].no_cache  # every layer trains: timm's forward, nothing split
    with pytest.raises(SystemExit, match="--train-from blocks.1: test_vit's forward is not"):
        small_model("test_vit", "blocks.1")  # its stages raise: a message, not a traceback


def test_unknown_stage_and_unknown_model_are_clear():
    with pytest.raises(SystemExit, match="layer1, layer2, layer3, layer4$"):
        small_model("resnet18", "layer5")
    for blocks in (0, 4):  # the shared ViT option is refused, not ignored; its default passes
        with pytest.raises(SystemExit, match=f"--trainable-blocks {blocks}: .*--train-from STAGE"):
            small_model("resnet18", trainable_blocks=blocks)
    for blocks in ("0", "2"):  # issue 22: given, even as the ViTs' default, it is refused
        with pytest.raises(SystemExit, match=f"--trainable-blocks {blocks}: .*--train-from"):
            baselines.main(["--benchmark", "--model", "resnet18", "--trainable-blocks", blocks])
    with pytest.raises(SystemExit, match="--epochs 0: a CNN has no zero-shot classifier"):
        baselines.main(["--benchmark", "--model", "resnet18", "--epochs", "0"])
    with pytest.raises(SystemExit, match="--model no_such_net: unknown"):
        small_model("no_such_net")
    with pytest.raises(SystemExit, match="--model resnet50.no_such_tag: unknown"):
        small_model("resnet50.no_such_tag")


def test_local_weights_files(tmp_path):
    """A torchvision state dict loads into timm's model (classifier replaced afterwards, so any
    class count fits); another architecture's file and files that are not weights at all stop
    with one clear message (torch's list of the keys that do not fit)."""
    torch.manual_seed(3)
    source = torchvision.models.resnet18()  # as saved from an ImageNet model: 1000 classes
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, _ = small_model("resnet18", "layer4", pretrained=str(path), seed=0)
    ours = model.network.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    assert ours["fc.weight"].shape == (4, 512)
    other_seed, _ = small_model("resnet18", "layer4", pretrained=str(path), seed=1)
    assert model.cache_key["weights"].startswith("file:")
    assert model.cache_key == other_seed.cache_key  # the fresh 4-class layer is not in the key

    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "seven.pth")
    assert small_model("resnet18", pretrained=str(tmp_path / "seven.pth"))[0].n_classes == 4

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(SystemExit, match=r"resnet34.pth: not a state dict of resnet18 .*"
                                         r"Unexpected key\(s\) in state_dict: .layer1.2.conv1"):
        small_model("resnet18", pretrained=str(tmp_path / "resnet34.pth"))
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "scan.jpg")
    for name in ("notes.txt", "scan.jpg", "missing.pth"):
        with pytest.raises(SystemExit, match=f"error: --pretrained .*{name}: not a state dict "
                                             f"of resnet18 .*torch.save"):
            small_model("resnet18", pretrained=str(tmp_path / name))


@pytest.mark.parametrize("name, source", [
    ("resnet50", "huggingface.co/timm/resnet50.tv2_in1k"),
    ("densenet121", "huggingface.co/timm/densenet121.tv_in1k"),
    ("xception", "xception-43020ad28.pth"),
])
def test_unavailable_weights_give_one_clear_message(monkeypatch, name, source):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SystemExit, match="--pretrained FILE") as error:
        small_model(name, pretrained="default")
    assert source in str(error.value) and "--pretrained none" in str(error.value)


def test_demo_learns_and_the_options_given_win(tmp_path, monkeypatch):
    """--demo supplies defaults (synthetic data, from scratch, 64 px, lr 1e-3, 20 epochs); every
    option given wins. Full fine-tuning learns the synthetic set and writes the run folder."""
    monkeypatch.setattr(clip_tumor, "DEMO_DIR", str(tmp_path / "demo"))
    out = tmp_path / "X"
    metrics = baselines.main(["--demo", "--model", "test_resnet", "--out", str(out),
                              "--epochs", "5", "--lr", "3e-3", "--image-size", "32"])
    assert metrics["test"]["accuracy"] >= 0.9 and not metrics["cached"]
    for name in ("config.json", "metrics.json", "predictions.csv", "report.txt",
                 "confusion_matrix.png", "curves.png", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"] == 5 and saved["model"] == "test_resnet"
    config = json.loads((out / "config.json").read_text())["args"]
    assert config["pretrained"] == "none" and config["views"] == 2  # the demo's defaults
    assert config["image_size"] == 32 and config["data"] == str(tmp_path / "demo" / "data-v3")


def test_resume_with_train_from_gives_same_result(synth_dir, tmp_path, monkeypatch):
    extra = ("--train-from", "layer3", "--epochs", "2", "--image-size", "32")
    whole = baselines.main(run_args(synth_dir, tmp_path, *extra, "--out", str(tmp_path / "a")))
    assert whole["cached"]
    kill_after_first_checkpoint(monkeypatch, clip_tumor)
    with pytest.raises(SystemExit, match="Ctrl-C.*--resume"):
        baselines.main(run_args(synth_dir, tmp_path, *extra, "--out", str(tmp_path / "b")))
    resumed = baselines.main(["--resume", str(tmp_path / "b")])
    assert resumed["best_epoch"] == whole["best_epoch"]
    for part in ("train", "val", "test"):
        assert resumed[part]["accuracy"] == whole[part]["accuracy"]
        assert resumed[part]["loss"] == pytest.approx(whole[part]["loss"], abs=1e-6)
