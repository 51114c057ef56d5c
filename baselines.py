"""Fine-tune the CNN baselines (ResNet-50, DenseNet-121, Xception) with the CLIP script's pipeline.

    python baselines.py --model resnet50 --data ./merged --seed 42      # the paper's baselines:
    python baselines.py --model densenet121 --data ./merged --seed 42   #   ImageNet weights, every
    python baselines.py --model xception --data ./merged --seed 42      #   layer trained
    python baselines.py --model resnet50 --data ./merged --train-from layer4   # CPU: cache the rest
    python baselines.py --demo --model densenet121                      # offline: synthetic data
    python baselines.py --benchmark --model resnet50                    # speeds, random weights

The paper re-implemented these on its own split: ResNet-50 95.81 %, Xception 97.43 %,
DenseNet-121 96.92 % test accuracy. It does not give their training recipe, so they get the CLIP
recipe (engine.py: AdamW 3e-4, warm restarts T_0=5, 30 epochs, batch 16, the same augmented
views, validation selection, loss options, checkpoints and run folder). ResNet-50 and
DenseNet-121 come from torchvision, Xception is Chollet's (timm's `legacy_xception`, the Keras
weights), and any other torchvision or timm classifier name works. The 1000-class ImageNet layer
is replaced by a fresh 4-class one. Images are resized to 224 x 224 for every model (the paper's
preprocessing) and normalised with the weights' own mean and std.

Default: full fine-tuning, as the paper implies; nothing is frozen, so nothing is cached and every
step runs the whole network. `--train-from STAGE` freezes the stages before STAGE and caches
their output on disk (engine.py), so each step runs only the trainable stages: that is what makes
these models trainable on a CPU.

Measured on a shared 2-core CPU, one thread (README, "CNN baselines"): ResNet-18 from scratch, all
layers, 128 px, 5 epochs on the Kaggle set (official split): test accuracy 0.9626, macro-F1 0.9603,
~190 s per epoch. `--demo` (ResNet-50, DenseNet-121 or Xception from scratch, 64 px synthetic
images): 98-100 % test accuracy in 1.5-2 minutes per model.
"""
import argparse
import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import engine

MODEL = "resnet50"       # torchvision or timm classifier name; "xception" = Chollet's (timm)
PRETRAINED = "default"   # default (ImageNet), a weights name or timm tag, a local file, or none
IMAGE_SIZE = 224         # "resize to 224 x 224" (the paper's preprocessing, for all models)
ALIASES = {"xception": "legacy_xception"}  # timm's port of the Keras Xception (Chollet 2017)
IMAGENET_MEAN = (0.485, 0.456, 0.406)      # torchvision's ImageNet weights all use these
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_HEAD_MODULES = {"global_pool", "head_drop", "fc_norm", "head", "fc", "classifier"}

DEMO_IMAGE_SIZE = 64     # --demo: --model from scratch on 64 px synthetic images


# ---- model -------------------------------------------------------------------------------------

def torchvision_stages(network):
    """(stages, head) of torchvision's ResNet and DenseNet families, in the order forward runs them.

    stages: [(name, module)] whose chained output is the last feature map; head: feature map ->
    logits, exactly the rest of the library's forward. Other torchvision models: None.
    """
    if isinstance(network, torchvision.models.ResNet):   # conv1 bn1 relu maxpool layer1..layer4
        stages = [(n, m) for n, m in network.named_children() if n not in ("avgpool", "fc")]
        return stages, lambda x: network.fc(torch.flatten(network.avgpool(x), 1))
    if isinstance(network, torchvision.models.DenseNet):  # conv0 .. denseblock1 transition1 ..
        stages = list(network.features.named_children())  # .. denseblock4 norm5
        return stages, lambda x: network.classifier(
            torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))
    return None


def timm_stages(network):
    """(stages, head) of a timm model: its top-level modules before the head, a Sequential
    (e.g. EfficientNet's `blocks`) opened into `blocks.0`, `blocks.1`, ...; head = forward_head.
    Whether they chain to forward_features is checked when the model is built."""
    stages = []
    for name, module in network.named_children():
        if name in TIMM_HEAD_MODULES:
            continue
        if isinstance(module, nn.Sequential):
            stages += [(f"{name}.{i}", m) for i, m in module.named_children()]
        else:
            stages.append((name, module))
    return stages, network.forward_head


class CNNClassifier(nn.Module):
    """A torchvision or timm classifier as a chain of stages: the frozen ones (before
    `train_from`) are the stem, whose output is cached; the rest and the head are the top."""

    def __init__(self, network, stages, head, train_from, name, weights, mean, std, image_size,
                 class_names=data.CLASSES):
        super().__init__()
        self.network = network  # the library's model, 4-class layer in place; forward runs it
        self.class_names = tuple(class_names)
        self.n_classes = len(class_names)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        names = [n for n, _ in stages]
        if train_from is not None and train_from not in names:
            raise SystemExit(f"--train-from {train_from}: {name} has no such stage; its stages "
                             f"in forward order are {', '.join(names) or '(none known)'}")
        n_frozen = names.index(train_from) if train_from else 0
        # Plain lists, not ModuleLists: the stages are registered once, under self.network.
        self.frozen_stages, self.trainable_stages = stages[:n_frozen], stages[n_frozen:]
        self.head = head
        frozen = []
        for _, stage in self.frozen_stages:
            stage.requires_grad_(False)
            frozen += list(stage.parameters()) + list(stage.buffers())  # BN statistics too
        self.train()
        self.cache_key = {"model": name, "weights": weights, "library": network.__module__,
                          "train_from": train_from if n_frozen else None,
                          "stem_stages": names[:n_frozen], "image_size": image_size,
                          "mean": list(mean), "std": list(std),
                          "augmentation": data.AUGMENTATION_ID,
                          "frozen_digest": engine.tensor_digest(frozen)}

    def train(self, mode=True):
        """Frozen stages stay in eval mode: their BatchNorm keeps its running statistics, so the
        full forward equals the cached stem's output at every step (a test checks it)."""
        super().train(mode)
        for _, stage in self.frozen_stages:
            stage.train(False)
        return self

    def stem(self, images):
        """Pixels in [0, 1] (B, 3, S, S) -> output of the frozen stages, e.g. (B, 1024, S/16, S/16)
        before ResNet-50's layer4; cached on disk. With nothing frozen: the normalised pixels."""
        x = (images - self.mean) / self.std
        for _, stage in self.frozen_stages:
            x = stage(x)
        return x

    def top(self, features, cls_only=True):
        """Trainable stages and the head, from the stem's output -> (B, C) logits.
        cls_only is the ViT scripts' option; a CNN has no CLS token and ignores it."""
        if not self.frozen_stages:
            return self.network(features)
        x = features
        for _, stage in self.trainable_stages:
            x = stage(x)
        return self.head(x)

    def forward(self, images):
        """The paper's way: the library's own forward on the whole network, every step."""
        return self.network((images - self.mean) / self.std)


def last_linear(network):
    """Name of torchvision's classifier layer: the last nn.Linear (fc, classifier, classifier.1,
    heads.head, ...)."""
    linears = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SystemExit(f"{type(network).__name__}: no Linear classifier layer to replace; "
                         f"choose a model that ends in one (resnet50, densenet121, ...)")
    return linears[-1]


def load_weights_file(network, path, classifier):
    """A local state dict (.pth/.pt/.bin, or .safetensors) into the network, every key but the
    classifier's (replaced afterwards) required to match by name and shape."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        theirs = load_file(path)
    else:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(theirs, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in theirs.values()):
        raise SystemExit(f"{path}: not a plain state dict (name -> tensor); save one with "
                         f"torch.save(model.state_dict(), path)")
    is_classifier = lambda key: key.startswith(classifier + ".")
    ours = {k: v for k, v in network.state_dict().items() if not is_classifier(k)}
    theirs = {k: v for k, v in theirs.items() if not is_classifier(k)}
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong_shape = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or unexpected or wrong_shape:
        raise SystemExit(
            f"{path}: does not fit {type(network).__name__}: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong_shape)} "
            f"of another shape {wrong_shape[:3]}. Pass the state dict of the same architecture "
            f"(torchvision's own old-format files, e.g. densenet121-a639ec97.pth, load through "
            f"~/.cache/torch/hub/checkpoints/ and --pretrained default instead)")
    network.load_state_dict(theirs, strict=False)


def offline_message(name, pretrained, error, url, cache_dir=None):
    """One message for weights that could not be downloaded: what failed and three ways out."""
    place = f"download {url}" + (f" into {cache_dir}/ (where it is looked for) and run again, or "
                                 f"pass it" if cache_dir else " and pass it")
    return (f"could not obtain the weights '{pretrained}' for {name} "
            f"({type(error).__name__}: {str(error)[:200]}).\nThis machine is probably offline. "
            f"Either run once where the internet is reachable, or {place} with --pretrained "
            f"/path/to/file, or use --pretrained none to train from scratch.")


def load_network(model_name, pretrained, n_classes):
    """(network with an n_classes layer, stages and head or None, weights id, mean, std).

    torchvision first (resnet50, densenet121, ...), then timm (legacy_xception, or `timm:NAME`
    to take timm's model of a name both have). One clear message when the weights cannot be had.
    """
    name = ALIASES.get(model_name, model_name)
    local_file = os.path.isfile(pretrained)
    tag = None if local_file or pretrained == "none" else pretrained
    if not name.startswith("timm:") and name in torchvision.models.list_models(
            module=torchvision.models):
        weights = None
        if tag is not None:
            enum = torchvision.models.get_model_weights(name)
            if tag != "default" and tag not in enum.__members__:
                raise SystemExit(f"--pretrained {tag}: {name} has weights "
                                 f"{', '.join(enum.__members__)}, default, none, or a file")
            weights = enum.DEFAULT if tag == "default" else enum[tag]
        try:
            network = torchvision.models.get_model(name, weights=weights)
        except Exception as error:
            if weights is None:
                raise
            raise SystemExit(offline_message(name, pretrained, error, weights.url,
                                             os.path.join(torch.hub.get_dir(), "checkpoints")))
        classifier = last_linear(network)
        if local_file:
            load_weights_file(network, pretrained, classifier)
        parent_name, _, child = classifier.rpartition(".")
        parent = network.get_submodule(parent_name)
        setattr(parent, child, nn.Linear(getattr(parent, child).in_features, n_classes))
        weights_id = str(weights) if weights is not None else "none"
        split, mean, std = torchvision_stages(network), IMAGENET_MEAN, IMAGENET_STD
    else:
        name = name.removeprefix("timm:")
        if not timm.is_model(name.split(".")[0]):
            raise SystemExit(f"--model {model_name}: unknown; choose a torchvision classifier "
                             f"(torchvision.models.list_models(), e.g. resnet50, densenet121) or "
                             f"a timm model (timm.list_models(), e.g. legacy_xception)")
        full_name = name if tag in (None, "default") else f"{name}.{tag}"
        try:
            network = timm.create_model(full_name, pretrained=tag is not None)
        except Exception as error:
            if tag is None:
                raise
            cfg = timm.models.get_pretrained_cfg(full_name)
            if cfg is not None and cfg.hf_hub_id:  # Hugging Face's cache has its own layout
                raise SystemExit(offline_message(
                    name, pretrained, error, f"https://huggingface.co/{cfg.hf_hub_id} "
                                             f"(model.safetensors)"))
            url = cfg.url if cfg is not None and cfg.url else f"the weights of {full_name}"
            raise SystemExit(offline_message(name, pretrained, error, url,
                                             os.path.join(torch.hub.get_dir(), "checkpoints")))
        if local_file:
            load_weights_file(network, pretrained, network.pretrained_cfg.get("classifier", "fc"))
        network.reset_classifier(n_classes)
        weights_id = f"{name}.{network.pretrained_cfg.get('tag')}" if tag is not None else "none"
        split = timm_stages(network)
        mean, std = network.pretrained_cfg["mean"], network.pretrained_cfg["std"]
    if local_file:
        weights_id = f"file:{engine.tensor_digest(network.parameters())[:16]}"
    return network, split, weights_id, tuple(mean), tuple(std)


def build_model(args):
    engine.set_seed(args.seed)  # from-scratch weights and the new 4-class layer depend on the seed
    pretrained = "none" if args.benchmark else args.pretrained  # benchmark: random weights
    network, split, weights, mean, std = load_network(args.model, pretrained,
                                                      len(data.CLASSES))
    name = args.model.removeprefix("timm:")
    if args.train_from and split is None:
        raise SystemExit(f"--train-from: the stages of {args.model} are not known; it works for "
                         f"torchvision's ResNet and DenseNet families and for timm models (try "
                         f"--model timm:{args.model}), or train every layer (no --train-from)")
    stages, head = split or ([], None)
    model = CNNClassifier(network, stages, head, args.train_from, name, weights, mean, std,
                          args.image_size)
    if model.frozen_stages:  # the stages must chain to the library's own forward: check once
        probe = torch.rand(2, 3, args.image_size, args.image_size,
                           generator=torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            split_logits, library_logits = model.top(model.stem(probe)), model(probe)
        model.train()
        if not torch.allclose(split_logits, library_logits, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"--train-from: {args.model}'s forward is not the chain of its "
                             f"stages; train every layer instead (no --train-from)")
    elif not args.no_cache:  # nothing is frozen, so there is nothing to cache
        print("training every layer: nothing is frozen, so nothing is cached; each step runs "
              "the whole network")
        args.no_cache = True
    return model


# ---- main --------------------------------------------------------------------------------------

def demo_arguments(workdir, args):
    """Synthetic data and the model from scratch at 64 px: the whole pipeline offline."""
    data_dir = os.path.join(workdir, "data")
    if not os.path.isdir(data_dir):
        data.write_synthetic_dataset(data_dir, per_class=60, seed=0)
    return ["--data", data_dir, "--model", args.model, "--pretrained", "none",
            "--image-size", str(DEMO_IMAGE_SIZE), "--epochs", "10", "--views", "2",
            "--lr", "1e-3", "--cache-dir", os.path.join(workdir, "cache"), "--seed", str(args.seed),
            "--out", f"runs/cnn-{args.model.removeprefix('timm:')}-demo", "--overwrite"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL,
                        help="torchvision classifier (resnet50, densenet121, ...), timm model "
                             "(legacy_xception, ...; timm:NAME forces timm), or xception "
                             "(= timm legacy_xception, Chollet's)")
    parser.add_argument("--pretrained", default=PRETRAINED,
                        help="default (ImageNet weights), a torchvision weights name "
                             "(IMAGENET1K_V1) or timm tag, a local state-dict file, or none "
                             "(train from scratch)")
    parser.add_argument("--train-from", metavar="STAGE",
                        help="freeze the stages before STAGE and cache their output (e.g. layer4 "
                             "for ResNets, denseblock4 for DenseNet, block12 for Xception); "
                             "default: train every layer (paper)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="images are resized to this square size (paper: 224)")
    engine.add_arguments(parser, default_out="runs/cnn-<model>-seed<seed>")
    return parser.parse_args(argv)


def main(argv=None):
    run_name = lambda args: "cnn-" + args.model.removeprefix("timm:")
    return engine.main(argv, parse_args, build_model, demo_arguments, run_name)


if __name__ == "__main__":
    main()
