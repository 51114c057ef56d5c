"""Fine-tune the CNN baselines (ResNet-50, DenseNet-121, Xception) with clip_tumor.py's pipeline.

    python baselines.py --model resnet50 --data ./merged --seed 42      # the paper's baselines
    python baselines.py --model resnet50 --data ./merged --train-from layer4   # CPU: cache the rest
    python baselines.py --demo --model densenet121                      # offline: synthetic data

No recipe in the paper (ResNet-50 95.81 %, Xception 97.43 %, DenseNet-121 96.92 %): CLIP's, from
timm's ImageNet weights, every layer trained. `--demo` (one thread, 2-core CPU): 100 % test accuracy
in 108 s (resnet50); before issue 21's fix 100 % in 115 s (densenet121), 98.3 % in 146 s (xception).
"""
import timm
import torch
import torch.nn as nn

import clip_tumor
import data

MODEL = "resnet50"       # one of the paper's three below, or a timm name (resnet50.tv_in1k)
PRETRAINED = "default"   # default (the model's ImageNet weights), a local file, or none
IMAGE_SIZE = 224         # "resize to 224 x 224" (the paper's preprocessing, for all models)
PAPER_MODELS = {"resnet50": "resnet50.tv2_in1k", "densenet121": "densenet121.tv_in1k",
                "xception": "legacy_xception.tf_in1k"}  # torchvision's V2, V1; Chollet's Keras
HEAD_MODULES = {"global_pool", "head_drop", "fc_norm", "head", "fc", "classifier"}  # timm's
STAGE_CONTAINERS = {"features", "blocks", "stages"}  # opened, so that each stage can be chosen


# ---- model -------------------------------------------------------------------------------------

class CNNClassifier(clip_tumor.FrozenStem):
    """A timm model as a chain of stages (conv1 ... layer4, features.conv0 ... features.norm5)."""

    def __init__(self, network, train_from, name, weights, image_size):
        mean, std = network.pretrained_cfg["mean"], network.pretrained_cfg["std"]
        super().__init__(mean, std, image_size)
        self.network = network  # timm's model, its 4-class layer in place
        stages = []  # (name, module); plain lists: the stages are registered once, in network
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
        self.frozen_stages, self.trainable_stages = stages[:n_frozen], stages[n_frozen:]
        self.frozen_parts = [stage for _, stage in self.frozen_stages]  # BatchNorm statistics kept
        stem = nn.Sequential(*self.frozen_parts).requires_grad_(False)
        self.cache_key = {"model": name, "weights": weights, "stem_stages": names[:n_frozen],
                          "image_size": image_size, "mean": list(mean), "std": list(std),
                          "architecture": repr(stem), "frozen_digest": clip_tumor.tensor_digest(
                              [*stem.parameters(), *stem.buffers()])}  # BN statistics too

    def stem(self, images):
        x = (images - self.mean) / self.std                              # pixels in [0, 1]
        for _, stage in self.frozen_stages:
            x = stage(x)
        return x                                       # (B, 1024, S/16, S/16) before layer4

    def top(self, features):
        for _, stage in self.trainable_stages:
            features = stage(features)
        return self.network.forward_head(features)

    def attention_blocks(self):  # none: attention rollout is for ViTs
        return []

    def explain_layer(self):  # Grad-CAM's activations: the last stage's output (B, K, h, w)
        return (self.frozen_stages + self.trainable_stages)[-1][1], "output"

    def forward(self, images):  # the paper's way: timm's own forward, every step
        return self.network((images - self.mean) / self.std)


def build_model(args):
    if args.trainable_blocks != clip_tumor.TRAINABLE_BLOCKS or "trainable_blocks" in getattr(
            args, "given", ()):  # the shared option is the ViTs', given or not
        raise SystemExit(f"error: --trainable-blocks {args.trainable_blocks}: a CNN has no "
                         f"transformer blocks; choose what trains with --train-from STAGE")
    if args.epochs == 0:  # zero-shot needs prompts (a text tower); this new layer is random
        raise SystemExit("error: --epochs 0: a CNN has no zero-shot classifier (its new 4-class "
                         "layer is random); train it for 1 or more epochs")
    clip_tumor.set_seed(args.seed)  # from-scratch weights and the new 4-class layer depend on it
    pretrained = "none" if args.benchmark else args.pretrained  # benchmark: random weights
    name = PAPER_MODELS.get(args.model, args.model)
    if name not in timm.list_models() + timm.list_pretrained():
        raise SystemExit(f"error: --model {args.model}: unknown; choose resnet50, densenet121, "
                         f"xception or a timm name (timm.list_pretrained(), e.g. resnet50.tv_in1k)")
    if pretrained == "default":  # downloaded from the hub
        clip_tumor.offline_unless_hub_answers()
    try:
        network = timm.create_model(name, pretrained=pretrained == "default")
    except OSError as error:  # offline (only a download reads a file here): where the weights are
        config = timm.models.get_pretrained_cfg(name)
        source = f"huggingface.co/{config.hf_hub_id}" if config.hf_hub_id else config.url
        raise SystemExit(f"error: --model {args.model}: cannot download {name} ({error!r:.200}); "
                         f"offline? pass --pretrained FILE (from {source}) or --pretrained none")
    config = network.pretrained_cfg
    weights = "none" if pretrained == "none" else f"{config['architecture']}.{config['tag']}"
    if pretrained not in ("default", "none"):  # a state dict file: every key and shape must fit
        head = config["classifier"] + "."  # any class count: this layer is replaced below
        try:
            theirs = timm.models.load_state_dict(pretrained)  # unwraps {"state_dict": ...}
            theirs.update({k: v for k, v in network.state_dict().items() if k.startswith(head)})
            network.load_state_dict(theirs)  # strict: torch names missing, unexpected, misshapen
        except Exception as error:  # not weights at all (text, JPEG, truncated), another model's
            raise SystemExit(f"error: --pretrained {pretrained}: not a state dict of {name} "
                             f"({error!r:.300}); pass one saved by torch.save or .safetensors")
        weights = f"file:{data.file_hash(pretrained)[:16]}"  # the file's SHA-1
    network.reset_classifier(len(data.CLASSES))  # a fresh 4-class layer (seeded above)

    model = CNNClassifier(network, args.train_from, args.model, weights, args.image_size)
    if not model.frozen_stages:  # nothing is frozen, so there is nothing to cache
        print("training every layer: nothing is frozen, so nothing is cached")
        args.no_cache = True
        return model
    probe = torch.rand(2, 3, args.image_size, args.image_size, generator=torch.Generator())
    with torch.no_grad():  # any timm name: check once that its stages chain to its own forward
        try:  # a ViT's blocks need its position embedding in between: no chain at all
            chains = torch.allclose(model.eval().top(model.stem(probe)), model(probe), 1e-4, 1e-4)
        except (RuntimeError, TypeError, ValueError, AttributeError):
            chains = False
        if not chains:
            raise SystemExit(f"error: --train-from {args.train_from}: {args.model}'s forward "
                             f"is not the chain of its stages; train every layer (no --train-from)")
    return model


# ---- main --------------------------------------------------------------------------------------

def build_parser():
    parser = clip_tumor.make_parser(__doc__)
    parser.add_argument("--model", default=MODEL, help="resnet50, densenet121, xception or timm's")
    parser.add_argument("--pretrained", default=PRETRAINED, help="default, none, or a file")
    parser.add_argument("--train-from", metavar="STAGE", help="freeze and cache the earlier stages")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input size (paper 224)")
    return parser


def main(argv=None):
    args = clip_tumor.parse_args(build_parser(), argv, lambda: dict(  # --demo: from scratch
        pretrained="none", image_size=64, epochs=10))
    return clip_tumor.run(args, build_model, "cnn")


if __name__ == "__main__":
    main()
