"""Fine-tune the CNN baselines (ResNet-50, DenseNet-121, Xception) with clip_tumor.py's pipeline.

    python baselines.py --model resnet50 --data ./merged --seed 42      # the paper's baselines
    python baselines.py --model resnet50 --data ./merged --train-from layer4   # CPU: cache the rest
    python baselines.py --demo --model densenet121                      # offline: synthetic data

The paper's baselines (its split: ResNet-50 95.81 %, Xception 97.43 %, DenseNet-121 96.92 %),
recipe not given, so CLIP's recipe with every layer trained, from timm's ImageNet weights:
resnet50 = resnet50.tv2_in1k (torchvision's default, IMAGENET1K_V2), densenet121 =
densenet121.tv_in1k (torchvision's IMAGENET1K_V1), xception = legacy_xception.tf_in1k (Chollet's
Keras weights); any timm name works too. A fresh 4-class layer replaces the 1000-class one.
`--train-from STAGE` freezes the stages before STAGE (BatchNorm statistics too) and caches
their output: each step runs only the rest, which makes CPU training feasible.

`python baselines.py --demo --model resnet50|densenet121|xception` (from scratch, 64 px synthetic
images, 20 epochs, one thread of a busy 2-core CPU): 100 % test accuracy each, 335/228/278 s.
"""
import timm
import torch
import torch.nn as nn

import clip_tumor
import data

MODEL = "resnet50"       # one of the paper's three below, or a timm name (resnet50.tv_in1k)
PRETRAINED = "default"   # default (the model's ImageNet weights), a local file, or none
IMAGE_SIZE = 224         # "resize to 224 x 224" (the paper's preprocessing, for all models)
PAPER_MODELS = {"resnet50": "resnet50.tv2_in1k",          # torchvision's IMAGENET1K_V2
                "densenet121": "densenet121.tv_in1k",      # torchvision's IMAGENET1K_V1
                "xception": "legacy_xception.tf_in1k"}     # Chollet's Keras Xception
HEAD_MODULES = {"global_pool", "head_drop", "fc_norm", "head", "fc", "classifier"}  # timm's
STAGE_CONTAINERS = {"features", "blocks", "stages"}  # opened, so that each stage can be chosen


# ---- model -------------------------------------------------------------------------------------

class CNNClassifier(nn.Module):
    """A timm classifier as a chain of stages: its modules before the head in forward order,
    containers opened (ResNet's conv1 ... layer4, DenseNet's features.conv0 ... features.norm5).
    The stages before `train_from` are the stem, frozen and cached; the rest and the head train."""

    def __init__(self, network, train_from, name, weights, image_size, class_names=data.CLASSES):
        super().__init__()
        self.network, self.image_size = network, image_size  # timm's model, 4-class layer in place
        self.class_names, self.n_classes = tuple(class_names), len(class_names)
        mean, std = network.pretrained_cfg["mean"], network.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        stages = []
        for child, module in network.named_children():
            if child in STAGE_CONTAINERS and isinstance(module, nn.Sequential):
                stages += [(f"{child}.{n}", m) for n, m in module.named_children()]
            elif child not in HEAD_MODULES:
                stages.append((child, module))
        names = [n for n, _ in stages]
        if train_from is not None and train_from not in names:
            raise SystemExit(f"error: --train-from {train_from}: {name} has no such stage; its "
                             f"stages in forward order are {', '.join(names)}")
        n_frozen = names.index(train_from) if train_from else 0
        # Plain lists, not ModuleLists: the stages are registered once, under self.network.
        self.frozen_stages, self.trainable_stages = stages[:n_frozen], stages[n_frozen:]
        stem = nn.Sequential(*[stage for _, stage in self.frozen_stages])  # a view, unregistered
        stem.requires_grad_(False)
        self.cache_key = {"model": name, "weights": weights, "stem_stages": names[:n_frozen],
                          "image_size": image_size, "mean": list(mean), "std": list(std),
                          "architecture": repr(stem), "frozen_digest": clip_tumor.tensor_digest(
                              [*stem.parameters(), *stem.buffers()])}  # BN statistics too

    def train(self, mode=True):
        """Frozen stages stay in eval mode (BatchNorm keeps its statistics): cached = full path."""
        super().train(mode)
        for _, stage in self.frozen_stages:
            stage.train(False)
        return self

    def stem(self, images):
        """Pixels in [0, 1] -> the frozen stages' output: (B, 1024, S/16, S/16) before layer4."""
        x = (images - self.mean) / self.std
        for _, stage in self.frozen_stages:
            x = stage(x)
        return x

    def top(self, features, cls_only=True):
        """Trainable stages and the head -> (B, C) logits (a CNN has no CLS: cls_only is unused)."""
        if not self.frozen_stages:  # full fine-tuning: the library's own forward
            return self.network(features)
        for _, stage in self.trainable_stages:
            features = stage(features)
        return self.network.forward_head(features)

    def forward(self, images):
        """The paper's way: the library's own forward on the whole network, every step."""
        return self.network((images - self.mean) / self.std)


def load_weights_file(network, path):
    """A state dict file (.pth, .safetensors) into the network, all keys and shapes matching
    (classifier aside: replaced anyway); returns the digest of the weights loaded."""
    try:
        theirs = timm.models.load_state_dict(path, weights_only=True)  # unwraps {"state_dict"}
    except Exception as error:  # a text file, an image, a truncated download, ...
        raise SystemExit(f"error: --pretrained {path}: not a readable weights file ({error!r:.120})"
                         f"; pass default, none, a .safetensors file or a state dict saved with "
                         f"torch.save(model.state_dict(), path)")
    ours = network.state_dict()
    classifier = network.pretrained_cfg["classifier"] + "."  # replaced anyway: not compared
    theirs.update({k: v for k, v in ours.items() if k.startswith(classifier)})
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong_shape = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or unexpected or wrong_shape:
        raise SystemExit(
            f"error: --pretrained {path}: does not fit {type(network).__name__}: {len(missing)} "
            f"missing key(s) {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong_shape)} of another shape {wrong_shape[:3]}; pass this model's state dict")
    network.load_state_dict(theirs)
    return clip_tumor.tensor_digest(v for k, v in theirs.items() if not k.startswith(classifier))


def build_model(args):
    clip_tumor.set_seed(args.seed)  # from-scratch weights and the new 4-class layer depend on it
    pretrained = "none" if args.benchmark else args.pretrained  # benchmark: random weights
    name = PAPER_MODELS.get(args.model, args.model)
    if name not in timm.list_models() + timm.list_pretrained():
        raise SystemExit(f"error: --model {args.model}: unknown; choose resnet50, densenet121, "
                         f"xception or a timm name (timm.list_pretrained(), e.g. resnet50.tv_in1k)")
    try:
        network = timm.create_model(name, pretrained=pretrained == "default")
    except Exception as error:  # offline: one message saying where the weights are
        if pretrained != "default":
            raise
        config = timm.models.get_pretrained_cfg(name)
        source = f"huggingface.co/{config.hf_hub_id}" if config.hf_hub_id else config.url
        raise SystemExit(f"error: --model {args.model}: cannot download {name} ({error!r:.200});"
                         f" offline? download the weights from {source} and pass --pretrained "
                         f"FILE, or --pretrained none")
    config = network.pretrained_cfg
    weights = "none" if pretrained == "none" else f"{config['architecture']}.{config['tag']}"
    if pretrained not in ("default", "none"):  # a local file
        weights = f"file:{load_weights_file(network, pretrained)[:16]}"
    network.reset_classifier(len(data.CLASSES))  # a fresh 4-class layer (seeded above)

    model = CNNClassifier(network, args.train_from, args.model, weights, args.image_size)
    if model.frozen_stages:  # the stages must chain to the library's own forward: check once
        probe = torch.rand(2, 3, args.image_size, args.image_size,
                           generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # in eval mode: BatchNorm uses its running statistics in both
            chained, library = model.eval().top(model.stem(probe)), model(probe)
        if not torch.allclose(chained, library, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"error: --train-from {args.train_from}: {args.model}'s forward is "
                             f"not the chain of its stages; train every layer (no --train-from)")
    elif not args.no_cache:  # nothing is frozen, so there is nothing to cache
        print("training every layer: nothing is frozen, so nothing is cached")
        args.no_cache = True
    return model


# ---- main --------------------------------------------------------------------------------------

def main(argv=None):
    parser = clip_tumor.make_parser(__doc__)
    parser.add_argument("--model", default=MODEL,
                        help="the paper's resnet50, densenet121 or xception, or any timm model")
    parser.add_argument("--pretrained", default=PRETRAINED,
                        help="default (ImageNet), a local state-dict file, or none (from scratch)")
    parser.add_argument("--train-from", metavar="STAGE", help="freeze and cache the stages "
                        "before STAGE (e.g. layer4); default: train every layer (the paper)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input size (paper 224)")
    args = clip_tumor.parse_args(parser, argv, pretrained="none", image_size=64, epochs=10)
    return clip_tumor.run(args, build_model, "cnn")


if __name__ == "__main__":
    main()
