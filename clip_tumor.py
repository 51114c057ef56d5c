"""Fine-tune CLIP's vision encoder (last 2 blocks) to classify brain MRI into 4 classes.

    python clip_tumor.py --data ./merged --seed 42        # the paper's run (ViT-B-16, openai)
    python clip_tumor.py --demo                           # offline: synthetic data, tiny model
    python clip_tumor.py --benchmark                      # speeds at full size, random weights
    torchrun --nproc_per_node N clip_tumor.py ...         # N processes or machines (README)

The method of Swetha & Kumar, "Multimodal Brain Tumor Classification Using BLIP and CLIP", top to
bottom: model, feature cache, training loop, run; blip_tumor.py, baselines.py and caption_tumor.py
reuse all but the model. The frozen blocks run once per image and view (the cache); a step runs
block 11 on all tokens and block 12 for the CLS query only. Measured (`--benchmark`, ViT-B-16,
batch 16, 2-core CPU, median of 4 runs): a cached step 62.3 ms per image vs 276.0 ms for the full
network (4.4x); the stem 168 ms per image and view, once; an FGSM view 498 ms. `--demo`: 0.933
test accuracy in 17 s. No accuracy with real pretrained weights is measured here (offline).
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time

import huggingface_hub.constants
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import stats

# ---- defaults: the paper's choices -------------------------------------------------------------
MODEL = "ViT-B-16"       # open_clip architecture
PRETRAINED = "openai"    # open_clip tag, hf-hub:org/repo, local weights file, or none
TRAINABLE_BLOCKS = 2     # "unfreeze vision encoder last 2 layers"
PROMPT = "a photo of a {} brain MRI"
PROMPT_NAMES = {"glioma": "glioma", "meningioma": "meningioma", "notumor": "no tumor",
                "pituitary": "pituitary"}  # the paper's class labels as text
MLP_HIDDEN = 512         # "Linear 768 to 512 with BatchNorm/ReLU, Linear 512 to 4"
EPOCHS = 30              # "30 epochs total"
BATCH_SIZE = 16          # "batch size of 16"
LEARNING_RATE = 3e-4     # "AdamW optimizer with a learning rate of 3e-4"
WEIGHT_DECAY = 0.01      # "AdamW's default weight decay"
RESTART_EPOCHS = 5       # "Cosine Annealing Warm Restarts (T_0 = 5 for 5-epoch cycles ..."
VAL_FRACTION = 0.1       # share of the training images that validates (stratified; not in paper)
WARMUP_EPOCHS = 1        # "... following warm-up)": its length is not given; one epoch, linear
FOCAL_GAMMA = 2.0        # focal loss exponent (the paper names focal loss, not its gamma)
VIEWS = 4                # view 0 plain + 3 augmented views per training image
FGSM_EPS = 0.01          # "Fast Gradient Sign Method ... epsilon = 0.01" ([0, 1] pixels)
PGD_STEPS = 7            # "PGD: ... a step of size = 0.01 for seven times"
PGD_STEP_SIZE = 0.01
PGD_EPS = 0.03           # PGD's L-inf radius, not given: 7 steps of 0.01 fit Madry et al.'s
                         # rule step = 2.5 x radius / steps at radius 0.028 (~8/255, the usual)
DEMO_DIR = os.path.join(tempfile.gettempdir(), "tumor-vlm-demo")

# A tiny ViT for --demo and the tests: same code paths, random weights, seconds to train.
TINY_CONFIG = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128,
                                              "head_width": 32, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                            "layers": 2}}


def set_seed(seed):
    """Seed NumPy and torch (all this code draws from) in one place."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def tensor_digest(tensors):
    """SHA-1 over the bytes of the given tensors: the identity of frozen weights."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


# ---- model -------------------------------------------------------------------------------------

def fused_qkv(qkv, heads, normed, n_queries=None):
    """(query (B, nh, Q, hd), keys, values (B, nh, T, hd)) of a fused qkv Linear (timm's, BLIP's:
    weight rows [0, D) query, [D, 2D) keys, [2D, 3D) values), the query for the first n_queries."""
    width = normed.shape[-1]
    bias = qkv.bias if qkv.bias is not None else qkv.weight.new_zeros(3 * width)
    queries = normed if n_queries is None else normed[:, :n_queries]
    query = F.linear(queries, qkv.weight[:width], bias[:width])          # (B, Q, D)
    keys, values = F.linear(normed, qkv.weight[width:], bias[width:]).chunk(2, dim=-1)
    by_head = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    return by_head(query), by_head(keys), by_head(values)


def cls_only_block(block, tokens):
    """block(tokens)[:, :1] of an open_clip or timm ViT block (a test: 1e-5): keys and values from
    all tokens, the rest for CLS alone, ~2/3 of the block's work skipped for ViT-B/16."""
    if hasattr(block, "ln_1"):  # open_clip ResidualAttentionBlock: nn.MultiheadAttention
        normed = block.ln_1(tokens)                                      # (B, 1 + H*W, D)
        attended = block.attn(normed[:, :1], normed, normed, need_weights=False)[0]  # (B, 1, D)
        cls = tokens[:, :1] + block.ls_1(attended)
        return cls + block.ls_2(block.mlp(block.ln_2(cls)))              # (B, 1, D)
    attn = block.attn  # timm Block
    query, keys, values = fused_qkv(attn.qkv, attn.num_heads, block.norm1(tokens), 1)
    attended = F.scaled_dot_product_attention(attn.q_norm(query), attn.k_norm(keys), values)
    cls = tokens[:, :1] + block.ls1(attn.proj(attn.norm(attended.transpose(1, 2).flatten(2))))
    return cls + block.ls2(block.mlp(block.norm2(cls)))                  # (B, 1, D)


class FrozenStem(nn.Module):
    """Every model's base: its input normalisation, size and classes; self.frozen_parts stay in eval
    mode (no dropout, fixed BatchNorm) while it trains, as in the cached path, which they equal."""

    def __init__(self, mean, std, image_size, class_names=data.CLASSES):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.image_size, self.class_names = image_size, class_names
        self.n_classes = len(class_names)

    def train(self, mode=True):
        super().train(mode)
        for part in self.frozen_parts:
            part.eval()
        return self


class CLIPClassifier(FrozenStem):
    """An open_clip vision tower (its own ViT, or a timm ViT as in BiomedCLIP) split into a
    frozen stem and a trainable top, plus a head."""

    def __init__(self, clip_model, tokenizer, head, name, weights, trainable_blocks,
                 class_names=data.CLASSES):
        visual, cfg = clip_model.visual, __import__("open_clip").get_model_preprocess_cfg(
            clip_model)  # mean and std
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else \
            visual.image_size
        super().__init__(cfg["mean"], cfg["std"], size, tuple(class_names))
        self.visual = visual  # the text tower is used below, then dropped
        self.trunk = getattr(visual, "trunk", None)  # timm's VisionTransformer, or None
        if self.trunk is not None and getattr(self.trunk, "global_pool", "") == "token":
            blocks, post = self.trunk.blocks, [self.trunk.norm, self.trunk.fc_norm, visual.head]
        elif hasattr(visual, "conv1") and getattr(visual, "pool_type", "tok") == "tok" \
                and getattr(visual, "attn_pool", None) is None:
            blocks, post = visual.transformer.resblocks, [visual.ln_post, visual.proj]
        else:
            raise SystemExit(f"error: --model {name}: only ViTs that classify from a CLS token "
                             f"are supported (open_clip's ViT-B-16, ..., or a timm ViT tower)")
        assert isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity), \
            f"{name}: patch dropout is on; the cached path would differ from the full forward"
        if not 0 <= trainable_blocks <= len(blocks):
            raise SystemExit(f"error: --trainable-blocks {trainable_blocks}: 0 to {len(blocks)}")
        split = len(blocks) - trainable_blocks
        self.stem_blocks, self.top_blocks = blocks[:split], blocks[split:]
        clip_model.eval().requires_grad_(False)  # trainable: top blocks, final norm, projection
        for part in [*self.top_blocks, *post]:
            part.requires_grad_(True)
        root = self.trunk if self.trunk is not None else visual  # embeddings, blocks, post norm
        self.frozen_parts = [*self.stem_blocks, *(child for child in root.children() if not any(
            child is part for part in [blocks, getattr(visual, "transformer", 0), *post]))]
        with torch.no_grad():  # prompts are encoded once (in eval mode: no dropout) and kept fixed
            prompts = tokenizer([PROMPT.format(PROMPT_NAMES.get(c, c)) for c in class_names])
            text = F.normalize(clip_model.encode_text(prompts).float(), dim=-1)
        self.register_buffer("class_prompts", text)                      # (C, E)
        self.head_type = head
        width = self.trunk.embed_dim if self.trunk is not None else visual.conv1.out_channels
        self.logit_scale = nn.Parameter(clip_model.logit_scale.detach().clone().float(),
                                        requires_grad=head == "cosine")
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, MLP_HIDDEN), nn.BatchNorm1d(MLP_HIDDEN),
                                      nn.ReLU(), nn.Linear(MLP_HIDDEN, self.n_classes))
        elif head == "linear":  # the paper's "linear head (768 to 4)"
            self.head = nn.Linear(width, self.n_classes)
        elif head == "fusion":  # one score per (image, class prompt) pair
            self.head = nn.Sequential(nn.Linear(2 * text.shape[1], MLP_HIDDEN), nn.ReLU(),
                                      nn.Linear(MLP_HIDDEN, 1))
        # the stem's identity (the head is not in visual: every head shares one cache)
        self.cache_key = {"model": name, "weights": weights, "stem_blocks": split,
                          "image_size": self.image_size, "mean": cfg["mean"], "std": cfg["std"],
                          "architecture": repr(visual), "frozen_digest": tensor_digest(
                              p for p in visual.parameters() if not p.requires_grad)}

    def embed(self, images):
        """Pixels in [0, 1] -> patch + CLS tokens with positions, as the tower's forward does."""
        x = (images - self.mean) / self.std
        if self.trunk is not None:  # timm: patch embedding, CLS token and positions, norm_pre
            return self.trunk.norm_pre(self.trunk._pos_embed(self.trunk.patch_embed(x)))
        x = self.visual.conv1(x).flatten(2).transpose(1, 2)              # (B, H*W, D)
        cls = self.visual.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.visual.positional_embedding.to(x.dtype)
        return self.visual.ln_pre(x)                                     # (B, 1 + H*W, D)

    def stem(self, images):
        """The frozen part, cached: (B, 1 + H*W, D) tokens entering the trainable blocks, or
        (B, 1, D), the final CLS token, when none trains (a linear probe)."""
        x = self.embed(images)
        for block in self.stem_blocks:
            x = block(x)
        return x if len(self.top_blocks) else x[:, :1]

    def top(self, tokens):
        """Cached stem tokens -> logits: the last block for CLS only."""
        if not len(self.top_blocks):
            return self.classify(tokens[:, 0])
        for block in self.top_blocks[:-1]:
            tokens = block(tokens)
        return self.classify(cls_only_block(self.top_blocks[-1], tokens)[:, 0])

    def attention_blocks(self):
        return [*self.stem_blocks, *self.top_blocks]

    def explain_layer(self):  # Grad-CAM's activations: the tokens entering the last block
        return self.attention_blocks()[-1], "input"

    def forward(self, images):
        """The paper's way: the whole vision transformer on every token, every step."""
        blocks = self.trunk.blocks if self.trunk is not None else self.visual.transformer
        return self.classify(blocks(self.embed(images))[:, 0])

    def classify(self, cls):
        """(B, D) CLS output of the last block -> (B, C) logits."""
        if self.trunk is not None:
            features = self.trunk.fc_norm(self.trunk.norm(cls))
        else:
            features = self.visual.ln_post(cls)
        if self.head_type in ("mlp", "linear"):
            return self.head(features)
        image = self.visual.head(features) if self.trunk is not None else \
            features @ self.visual.proj
        image = F.normalize(image, dim=-1)                               # (B, E)
        if self.head_type == "fusion":
            pairs = torch.cat([image[:, None].expand(-1, self.n_classes, -1),
                               self.class_prompts[None].expand(len(image), -1, -1)], dim=-1)
            return self.head(pairs).squeeze(-1)                          # (B, C)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # at most 100, as CLIP's
        return scale * image @ self.class_prompts.t()                    # cosine head


def offline_unless_hub_answers():
    """Offline, the hub's client retries for ~25-50 s before it fails: if huggingface.co does not
    answer in 3 s, it is told to use its cache alone (cached weights load, others fail at once)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_clip(model_name, pretrained, activation=None):
    """open_clip model and tokenizer, with the activation the weights were trained with."""
    import open_clip
    if model_name.endswith(".json"):  # a custom architecture in open_clip's config format
        if not os.path.isfile(model_name):
            raise SystemExit(f"error: --model {model_name}: model config not found")
        open_clip.add_model_config(model_name)
        model_name = os.path.splitext(os.path.basename(model_name))[0]
    # BiomedCLIP and other hub models: config and weights from the hub or its downloaded folder
    from_hub = model_name.startswith(("hf-hub:", "local-dir:"))
    if model_name not in open_clip.list_models() and not from_hub:
        raise SystemExit(f"error: --model {model_name}: unknown; choose one of open_clip."
                         f"list_models() (e.g. ViT-B-16), hf-hub:org/repo, local-dir:FOLDER "
                         f"(a downloaded hub model), or a .json config")
    local_file = os.path.isfile(pretrained)
    weights = None if pretrained == "none" or from_hub else pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights and not local_file and weights not in tags:
        raise SystemExit(f"error: --pretrained {pretrained}: no such file, nor a tag of "
                         f"{model_name} ({', '.join(tags) or 'none'}); pass a file, a tag or none")
    if weights and not local_file or model_name.startswith("hf-hub:"):
        offline_unless_hub_answers()
    # OpenAI's weights were trained with QuickGELU; a tag says so itself, a local file cannot
    tag = weights if weights and not local_file else "openai"
    openai_gelu = open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu")
    if local_file and openai_gelu and "quickgelu" not in model_name and not activation:
        raise SystemExit(f"error: --pretrained {pretrained}: OpenAI's {model_name} weights were "
                         f"trained with QuickGELU and a file does not say whose it is: pass "
                         f"--model {model_name}-quickgelu if it holds OpenAI's, or --activation "
                         f"gelu if it holds weights trained with GELU")
    quick_gelu = activation == "quickgelu" or not activation and weights and not local_file \
        and openai_gelu
    try:
        model = open_clip.create_model(model_name, pretrained=weights,
                                       force_quick_gelu=bool(quick_gelu))
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as error:
        if weights is None and not from_hub:
            raise
        problem = f"{type(error).__name__}: {str(error)[:200]}"
        raise SystemExit(f"error: --pretrained {pretrained}: not weights of {model_name} "
                         f"({problem})" if local_file else
                         f"error: cannot obtain the weights '{pretrained}' of {model_name} "
                         f"({problem}). Offline? Run once online (cached in ~/.cache/huggingface)"
                         f", or pass --pretrained /path/to/open_clip_pytorch_model.bin, a hub "
                         f"model's folder (--model local-dir:D) or --pretrained none (random).")
    if local_file or from_hub:
        weights = f"file:{tensor_digest(model.visual.parameters())[:16]}"
    return model, tokenizer, weights or "none"


def build_model(args):
    set_seed(args.seed)  # random-init weights (--pretrained none) depend on the seed
    pretrained = "none" if args.benchmark else args.pretrained  # benchmark: random weights
    activation = getattr(args, "activation", None)  # CLIP's option only
    clip_model, tokenizer, weights = load_clip(args.model, pretrained, activation)
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".json")
    head = "cosine" if args.epochs == 0 else args.head  # zero-shot: the prompts are the head
    return CLIPClassifier(clip_model, tokenizer, head, name, weights, args.trainable_blocks)


# ---- adversarial examples: FGSM and PGD ---------------------------------------------------------

def attack(model, images, labels, steps, step_size, radius):
    """Adversarial copies of [0, 1] images (B, 3, S, S): `steps` signed-gradient steps up the loss,
    each projected to the L-inf ball of `radius` and [0, 1]; as torchattacks (a test compares)."""
    was_training = model.training
    model.eval()
    adversarial = images.detach()
    for _ in range(steps):  # each step a full forward and backward, frozen stem included
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        gradient, = torch.autograd.grad(loss, adversarial)  # d loss / d pixels only
        stepped = adversarial.detach() + step_size * gradient.sign()
        adversarial = (images + (stepped - images).clamp(-radius, radius)).clamp(0, 1).detach()
    model.train(was_training)
    return adversarial


def attack_settings(args, method):
    """(steps, step size, radius) of "fgsm" or "pgd" from the options."""
    if method == "fgsm":
        return 1, args.eps, args.eps
    return args.pgd_steps, args.pgd_step_size, args.pgd_eps


def adversarial_view_maker(args, build_model, device, samples, hashes):
    """(make_view, view id): the cached path's adversarial view, the plain one attacked once by the
    starting model (prompt head: no seed enters). Static: the paper's (--no-cache) is per batch."""
    labels = {hashes[s.path]: s.label for s in samples}
    conflicts = [s.path for s in samples if labels[hashes[s.path]] != s.label]
    if conflicts:
        raise SystemExit(f"error: {conflicts[0]}: a byte-identical copy of it is in another class "
                         f"folder; an adversarial view needs one label: remove one of the two")
    attacker = build_model(argparse.Namespace(**dict(vars(args), head="cosine"))).to(device)
    settings = attack_settings(args, args.adversarial)
    view_id = "{}-{}x{}-r{}-{}".format(args.adversarial, *settings, tensor_digest(
        attacker.state_dict().values())[:12])  # file name part: the attack and its model

    def make_view(image, content_hash, view, image_size):
        pixels = data.image_view(image, content_hash, 0 if view == view_id else view, image_size)
        if view != view_id:
            return pixels
        label = torch.tensor([labels[content_hash]], device=device)
        return attack(attacker, pixels[None].to(device), label, *settings)[0].cpu()
    return make_view, view_id


def attacked_accuracy(model, test_inputs, args):
    """metrics["test_fgsm"], ["test_pgd"]: the full network's accuracy on attacked test images
    (about --attack-n of them, stratified) and on the same images clean."""
    samples = test_inputs.samples
    if args.attack_n and args.attack_n < len(samples):
        samples = data.stratified_split(samples, args.attack_n / len(samples), args.seed)[1]
    pixels = data.Inputs(samples, test_inputs.hashes, test_inputs.data_dir, model, None)
    correct = {"clean": 0, "fgsm": 0, "pgd": 0}
    for start in range(0, len(samples), args.batch_size):
        indices = list(range(start, min(start + args.batch_size, len(samples))))
        images = pixels.batch(indices, [0] * len(indices)).to(model.mean.device)
        labels = pixels.labels[indices].to(model.mean.device)
        for method in correct:
            attacked = images if method == "clean" else \
                attack(model, images, labels, *attack_settings(args, method))
            with torch.no_grad():
                correct[method] += (model(attacked).argmax(-1) == labels).sum().item()
    return {f"test_{method}": dict(zip(("steps", "step_size", "eps"), attack_settings(
        args, method)), accuracy=correct[method] / len(samples), n_attacked=len(samples),
        clean_accuracy=correct["clean"] / len(samples)) for method in ("fgsm", "pgd")}


# ---- several processes: torchrun ---------------------------------------------------------------
# `torchrun --nproc_per_node N SCRIPT.py ...`: N ranks build the same seeded model, each its share
# of the cache and every N-th image of a global batch; DDP averages the gradients; rank 0 alone
# writes, prints and evaluates. Without torchrun (no WORLD_SIZE) none of this runs.

def init_distributed(device):
    """This rank, after joining torchrun's group if any (gloo on CPU, NCCL with a GPU per rank). A
    dead rank ends the job (torchrun stops the others); a stalled one, by the 60 s timeout."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" else None
        if gpu:
            torch.cuda.set_device(gpu)  # "cuda" is now this rank's GPU
        dist.init_process_group("nccl" if gpu else "gloo", device_id=gpu,
                                timeout=datetime.timedelta(seconds=60))
        if dist.get_rank() > 0:  # one log, rank 0's (errors still show: they go to stderr)
            sys.stdout, data.PROGRESS = open(os.devnull, "w"), False
    return rank_and_world()[0]


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Logits(nn.Module):  # DDP syncs what runs through forward(); the cached path is model.top()
    def __init__(self, inputs):
        super().__init__()
        self.model, self.logits = inputs.model, inputs.logits

    def forward(self, batch):
        return self.logits(batch)


def data_parallel(inputs):
    """The step's logits: inputs.logits, under torchrun through DDP (static graph: some weights go
    unused). BatchNorm syncs on GPU only (SyncBatchNorm); on CPU each rank normalises its slice."""
    if not dist.is_initialized():
        return inputs.logits
    if inputs.model.mean.is_cuda:
        nn.SyncBatchNorm.convert_sync_batchnorm(inputs.model)
    return nn.parallel.DistributedDataParallel(Logits(inputs), static_graph=True)


def rank_slice(indices, labels, class_weight):
    """(this rank's images of a global batch, its loss factor): DDP averages gradients, so N x its
    share of the batch's weight (images, or class weights) makes even ragged slices exact."""
    rank, world = rank_and_world()
    weight = lambda y: len(y) if class_weight is None else class_weight[y].sum().item()
    mine = indices[rank::world]
    return mine, world * weight(labels[mine]) / weight(labels[indices])


# ---- training ----------------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save, its bytes' SHA-1 first and written atomically (stats.write_checked)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    stats.write_checked(path, buffer.getvalue())


def load_checkpoint(path, model=None):
    """The dict atomic_save wrote (damaged: stops, named); with model, loads its weights, which
    must be finite and exactly the model's trainable ones (strict=False alone skips others)."""
    checkpoint = torch.load(io.BytesIO(stats.read_checked(path, True)), weights_only=True)
    weights = checkpoint["model"]
    problem = "" if model is None or set(weights) == set(trainable_state(model)) else \
        f"not the trainable weights of this {type(model).__name__}"
    if not all(torch.isfinite(w).all() for w in weights.values()):
        problem = "weights that are not finite (training diverged)"
    if problem:
        raise SystemExit(f"error: {path}: {problem}; train the run again (--overwrite)")
    if model is not None:
        model.load_state_dict(weights, strict=False)
    return checkpoint


def focal_loss(logits, targets, weight=None, gamma=FOCAL_GAMMA):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma per sample."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    losses = -(1 - log_p.exp()) ** gamma * log_p
    w = weight[targets] if weight is not None else torch.ones_like(losses)
    return (w * losses).sum() / w.sum()  # weighted mean, as F.cross_entropy does


def make_loss(name, class_weight):
    ce = lambda logits, y: F.cross_entropy(logits.float(), y, weight=class_weight)
    focal = lambda logits, y: focal_loss(logits, y, class_weight)
    hybrid = lambda logits, y: 0.5 * (ce(logits, y) + focal(logits, y))
    return {"ce": ce, "focal": focal, "hybrid": hybrid}[name]


def balanced_class_weights(labels, n_classes):
    """n / (C * n_c): each class contributes equally to the loss (sklearn's 'balanced')."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def learning_rate(progress, lr, warmup_epochs):
    """LR at `progress` epochs: linear warm-up, then torch's CosineAnnealingWarmRestarts (T_0=5,
    eta_min=0; a test compares) restarted every RESTART_EPOCHS."""
    if progress < warmup_epochs:
        return lr * progress / warmup_epochs
    position = (progress - warmup_epochs) % RESTART_EPOCHS
    return lr * 0.5 * (1 + math.cos(math.pi * position / RESTART_EPOCHS))


def trainable_state(model):
    """Trainable parameters plus the buffers of their modules (BatchNorm running statistics)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    owners = {n.rpartition(".")[0] for n in names}
    names |= {n for n, _ in model.named_buffers() if n.rpartition(".")[0] in owners}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


@torch.no_grad()
def predict(inputs, batch_size):
    """(logits (N, C) as NumPy, mean cross-entropy) on view 0 of every sample."""
    inputs.model.eval()
    logits = []
    for start in range(0, len(inputs), batch_size):
        indices = list(range(start, min(start + batch_size, len(inputs))))
        batch = inputs.batch(indices, [0] * len(indices)).to(inputs.model.mean.device)
        logits.append(inputs.logits(batch).float().cpu())
    logits = torch.cat(logits) if logits else torch.zeros(0, inputs.model.n_classes)
    return logits.numpy(), F.cross_entropy(logits, inputs.labels).item() if len(inputs) else 0.0


def accuracy_and_loss(inputs, batch_size):
    """(accuracy, mean cross-entropy) on view 0 of a split: what picks a classifier's best epoch."""
    logits, loss = predict(inputs, batch_size)
    return stats.accuracy(inputs.labels.numpy(), logits.argmax(1)), loss


def train(model, train_inputs, select_inputs, args, out_dir, checkpoint=None, view_ids=None,
          batch_loss=None, select=None):
    """The training loop: AdamW, warm-up and warm restarts, each image's view drawn from view_ids
    every epoch, the best epoch by the selection split's accuracy (a tie: the lower loss). The
    captioner passes its own batch_loss(batch, indices) and select(inputs) -> ("cider", ...)."""
    device = model.mean.device
    params = [p for p in model.parameters() if p.requires_grad]  # no weight decay for gains,
    optimizer = torch.optim.AdamW([  # biases and the logit scale, as open_clip's training
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=args.lr, weight_decay=args.weight_decay)
    class_weight = balanced_class_weights(train_inputs.labels.numpy(), model.n_classes) \
        if args.class_weights else None
    loss_fn = make_loss(args.loss, class_weight.to(device) if class_weight is not None else None)
    logits_of = data_parallel(train_inputs)
    select = select or (lambda inputs: ("accuracy", *accuracy_and_loss(inputs, args.batch_size)))
    save = atomic_save if rank_and_world()[0] == 0 else lambda obj, path: None  # rank 0 writes
    state = {"epoch": 0, "best_score": -1.0, "best_loss": math.inf, "best_epoch": 0,
             "history": []}
    if checkpoint is not None:  # --resume: all the next epoch depends on (weights: run_one)
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = {k: checkpoint[k] for k in state}

    n, history = len(train_inputs), state["history"]
    view_ids = view_ids or list(range(args.views))
    steps = max(n // args.batch_size, 1)  # drop the ragged last batch (BatchNorm needs > 1)
    for epoch in range(state["epoch"], args.epochs):
        started = time.time()
        # batch order and views come from (seed, epoch) alone, so a resumed run replays them
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        views = [view_ids[k] for k in torch.randint(0, len(view_ids), (n,), generator=g).tolist()]
        if train_inputs.cache is None:  # no cache: fresh augmentations from (seed, epoch, image)
            views = [v if v == 0 else f"{v}-seed{args.seed}-epoch{epoch}" for v in views]
        model.train()
        seen, correct, total_loss = 0, 0, 0.0
        for step in tqdm(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                         disable=not data.PROGRESS):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch + step / steps, args.lr,  # at the step's start
                                            args.warmup_epochs)
            indices, share = rank_slice(order[step * args.batch_size:(step + 1) *
                                              args.batch_size], train_inputs.labels, class_weight)
            batch = train_inputs.batch(indices, [views[i] for i in indices]).to(device)
            labels = train_inputs.labels[indices].to(device)
            if args.adversarial != "none" and train_inputs.cache is None:  # the exact way: attack
                adversarial = attack(model, batch, labels, *attack_settings(args, args.adversarial))
                batch, labels = torch.cat([batch, adversarial]), torch.cat([labels, labels])  # 1:1
            if batch_loss is None:
                logits = logits_of(batch)
                loss = loss_fn(logits, labels)
                correct += (logits.argmax(-1) == labels).sum().item()  # a CPU-GPU sync point
            else:
                loss = batch_loss(batch, indices)
            if not torch.isfinite(loss):  # diverged: stop before NaN reaches any result
                raise SystemExit(f"error: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                 f"{step + 1}: training diverged; try a lower --lr than {args.lr}")
            optimizer.zero_grad(set_to_none=True)
            (loss * share).backward()
            optimizer.step()
            seen += len(labels)
            total_loss += loss.item() * len(labels)
        totals = torch.tensor([seen, correct, total_loss], dtype=torch.float64, device=device)
        if dist.is_initialized():  # the epoch's numbers over every rank's images
            dist.all_reduce(totals)
        seen, correct, total_loss = totals.tolist()
        metric, score, select_loss = select(select_inputs)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen, **(
            {"train_accuracy": correct / seen} if batch_loss is None else {}),
            "select_loss": select_loss, f"select_{metric}": score,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started})
        if math.isfinite(select_loss) and (score, -select_loss) > (state["best_score"],
                                                                   -state["best_loss"]):
            state.update(best_score=score, best_loss=select_loss, best_epoch=epoch + 1)
            save({"model": trainable_state(model), "epoch": epoch + 1, "config": vars(args)},
                 f"{out_dir}/best.pt")
        state["epoch"] = epoch + 1
        save({"model": trainable_state(model), "optimizer": optimizer.state_dict(), **state,
              "config": vars(args)}, f"{out_dir}/checkpoint.pt")
        shown = lambda part: " ".join(f"{key.split('_', 1)[1]} {value:.4f}" for key, value
                                      in history[-1].items() if key.startswith(part))
        print(f"epoch {epoch + 1}/{args.epochs}: train {shown('train_')} | {args.select_on} "
              f"{shown('select_')} | {history[-1]['seconds']:.1f}s", flush=True)
    if not state["best_epoch"]:
        raise SystemExit(f"error: no epoch had a finite {args.select_on} loss: training diverged; "
                         f"try a lower --lr than {args.lr}")
    return history, state["best_epoch"]


# ---- the run: data -> cache -> train -> evaluate -> run folder ---------------------------------

def check_arguments(args, epochs_done=0):
    """The device, or one error naming every option out of range, its value and what is allowed."""
    device = pick_device(args)
    problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in (
        ("views", args.views, args.views >= 1, "at least 1 (view 0 is the plain image)"),
        ("batch-size", args.batch_size, args.batch_size >= 2 or getattr(args, "head", "mlp") !=
         "mlp", "at least 2 for BatchNorm (--head mlp, a CNN)"),
        ("epochs", args.epochs, args.epochs >= epochs_done, f"the run has done {epochs_done}: "
         f"{epochs_done} or more" if epochs_done else "0 (zero-shot) or more"),
        ("lr", args.lr, args.lr > 0, "positive"),
        ("val-fraction", args.val_fraction, args.val_fraction is None or 0 < args.val_fraction < 1,
         "between 0 and 1"),
        ("seed", args.seed, 0 <= args.seed < 2 ** 32, "0 to 2**32 - 1"),
        ("split", args.split, not args.split or os.path.isfile(args.split),
         "no such file (make one with `python data.py split --data DIR --out S.csv --leak-free`)"),
        ("out", args.out, not args.out or not os.path.isfile(args.out), "is a file, not a folder"),
        ("shots", args.shots, args.shots is None or args.shots >= 1, "1 or more"),
        ("attack-n", args.attack_n, args.attack_n is None or args.attack_n >= 1, "1 or more"),
        ("pgd-steps", args.pgd_steps, args.pgd_steps >= 1, "1 or more"),
        ("eps", args.eps, 0 < args.eps <= 1, "in (0, 1], pixel units (paper: 0.01)"),
        ("pgd-eps", args.pgd_eps, 0 < args.pgd_eps <= 1, "in (0, 1], pixel units"),
        ("pgd-step-size", args.pgd_step_size, args.pgd_step_size > 0, "positive"),
        ("calibrate", "", not args.calibrate or args.select_on == "val",
         "needs the validation split (not --select-on test)"),
        ("data", args.data, args.data is not None, "missing: pass the dataset folder (or --demo)"),
        ("amp", "", not args.amp or device.type == "cuda", "CUDA only: on a CPU bfloat16 is far "
         "slower than float32 unless the chip has AVX512-BF16 or AMX"))
        if not ok]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return device


def pick_device(args):
    """--device: auto (CUDA when there is one), cpu or cuda[:N], checked against this machine."""
    gpu = torch.cuda.is_available()
    device = args.device if args.device != "auto" else "cuda" if gpu else "cpu"
    if device != "cpu" and not (device.split(":")[0] == "cuda" and gpu):
        raise SystemExit(f"error: --device {args.device}: use auto, cpu or cuda (this machine "
                         f"has {'a' if gpu else 'no'} CUDA GPU)")
    return torch.device(device)


def load_splits(args):
    """Train, validation and test samples; --shots K: K per class for training and (a K-shot
    protocol has no large validation set), unless --val-fraction is given, for validation."""
    val_fraction = 0.0 if args.select_on == "test" else args.val_fraction or VAL_FRACTION
    splits = data.load_splits(args.data, args.seed, val_fraction, args.split)
    if args.shots:
        labelled = splits.train + splits.val
        splits.train = data.few_shot(splits.train, args.shots, args.seed, "training")
        if args.val_fraction is None and splits.val:
            shots = {s.path for s in splits.train}
            splits.val = data.few_shot([s for s in labelled if s.path not in shots], args.shots,
                                       args.seed, "labelled non-training")
    if splits.non_images:
        print(f"note: {len(splits.non_images)} non-image file(s) ignored: {splits.non_images}")
    return splits


def cache_inputs(args, build_model, model, splits, hashes, cache, device):
    """(each split's Inputs, the training views, undecodable paths, seconds): the stem's output of
    every image and view cached (--no-cache: each image decoded once, to stop at a bad one)."""
    started = time.time()
    view_ids, make_view = list(range(args.views)), data.image_view
    if args.adversarial != "none" and cache and args.epochs:  # one cached adversarial view each
        make_view, view_id = adversarial_view_maker(args, build_model, device, splits.train,
                                                    hashes)
        view_ids.append(view_id)
    jobs = {s.path: (hashes[s.path], [0]) for s in splits.val + splits.test}
    jobs.update({s.path: (hashes[s.path], view_ids if cache else [0]) for s in splits.train})
    bad = data.build_cache(model, cache, jobs, args.data, args.batch_size, args.skip_bad,
                           make_view)
    inputs = {name: data.Inputs([s for s in getattr(splits, name) if s.path not in bad], hashes,
                                args.data, model, cache, make_view)
              for name in ("train", "val", "test")}
    return inputs, view_ids, bad, time.time() - started


def write_config(args, model, splits, split, bad, out_dir):
    """config.json: every option, the stem's identity, the split ({part: {path: SHA-1}}: a resume
    checks it), counts, what was left out; returns how the run trains adversarially."""
    adversarial = "none" if args.adversarial == "none" else f"{args.adversarial}, " + (
        "exact: each batch attacked by the current model and trained 1:1 with the clean one"
        if args.no_cache else "static: one cached view per training image, made once by the "
        "starting model (the paper's exact way: --no-cache)")
    counts = {name: np.bincount([s.label for s in getattr(splits, name) if s.path not in bad],
                                minlength=model.n_classes).tolist() for name in split}
    paths = {name: os.path.abspath(getattr(args, name))  # absolute: a resume works from anywhere
             for name in ("data", "split", "cache_dir") if getattr(args, name)}
    augmentation = "fresh every epoch, drawn from (seed, epoch, image)" if args.no_cache else \
        "fixed: --views per image made once from (image, view) and cached, shared by every " \
        "seed (a std over seeds leaves out augmentation variance)"
    stats.write_json({"args": {**vars(args), **paths}, "model_key": model.cache_key,
                      "counts": counts, "split_source": splits.source,
                      "classes": list(model.class_names), "non_images_ignored": splits.non_images,
                      "undecodable_skipped": bad, "augmentation": augmentation,
                      "adversarial_training": adversarial, "split": split},
                     os.path.join(out_dir, "config.json"))
    return adversarial


def resume_options(args, changeable=("data", "cache_dir", "device", "epochs")):
    """--resume RUN: (the run's own options but those in changeable that argv gave: a moved dataset
    or cache, the machine, more epochs; the run's split). Other options given are named, ignored."""
    if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise SystemExit(f"error: --out {args.out}: a resumed run continues in its own folder, "
                         f"{args.resume}; copy that folder to {args.out} first to continue there")
    saved = stats.run_config(args.resume)
    if not saved["args"]:
        raise SystemExit(f"error: --resume {args.resume}: no config.json there; pass a run "
                         f"folder made by a training script")
    given = {name: getattr(args, name) for name in args.given if name not in ("resume", "out")}
    ignored = [f"--{name.replace('_', '-')} {value}" for name, value in given.items()
               if name not in changeable and saved["args"].get(name) != value]
    if ignored:
        print(f"note: ignored with --resume (the run keeps its own options): {', '.join(ignored)}")
    args = argparse.Namespace(**{**vars(args), **saved["args"], **{  # today's defaults fill gaps
        name: value for name, value in given.items() if name in changeable},
        "resume": args.resume, "out": args.resume, "given": args.given})
    print(f"resuming {args.resume} with its own options ({args.epochs} epochs)")
    return args, saved.get("split")


def check_same_split(recorded, split, run_dir):
    """--resume: refuse images that differ from those the run started with (recorded: its
    config.json's split, {part: {path: SHA-1}}; a run older than this record has none)."""
    old, new = ({(part, path): sha1 for part, files in record.items() for path, sha1 in
                 files.items()} for record in (recorded or split, split))
    changes = {"added": new.keys() - old.keys(), "removed": old.keys() - new.keys(),
               "changed": {key for key in old.keys() & new.keys() if old[key] != new[key]}}
    if any(changes.values()):
        counts = ", ".join(f"{len(keys)} {change}" for change, keys in changes.items())
        examples = ", ".join("/".join(key) for key in sorted(set().union(*changes.values()))[:3])
        raise SystemExit(f"error: --resume {run_dir}: the dataset changed since the run started "
                         f"({counts}: {examples}); pass its own images with --data, or start anew")


def start_run(args, build_model, out_dir, recorded):
    """(device, checkpoint, splits, {part: {path: SHA-1}}, {path: SHA-1}, model): every input of a
    run checked (on --resume the checkpoint and the images, recorded), nothing written yet."""
    checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
    checkpoint = load_checkpoint(checkpoint_path) if args.resume and os.path.isfile(
        checkpoint_path) else None
    device = check_arguments(args, checkpoint["epoch"] if checkpoint else 0)
    set_seed(args.seed)
    splits = load_splits(args)
    split = {name: {s.path: data.file_hash(os.path.join(args.data, s.path)) for s in getattr(
        splits, name)} for name in ("train", "val", "test")}  # SHA-1s read once, for all uses
    if args.resume:
        check_same_split(recorded, split, out_dir)
    model = build_model(args).to(device)
    if checkpoint:
        load_checkpoint(checkpoint_path, model)
    hashes = {path: sha1 for part in split.values() for path, sha1 in part.items()}
    return device, checkpoint, splits, split, hashes, model


def run_one(args, build_model, out_dir, recorded=None):
    """One seed: splits, model, feature cache, training, evaluation, the run folder. Under torchrun
    rank 0 alone writes and evaluates."""
    device, checkpoint, splits, split, hashes, model = start_run(args, build_model, out_dir,
                                                                 recorded)
    rank = init_distributed(device)  # 0 without torchrun
    cache = None if args.no_cache else data.FeatureCache(args.cache_dir, model)
    with stats.run_folder(out_dir, args.overwrite, args.resume) if rank == 0 else \
            contextlib.nullcontext():  # claimed after every input check
        write = write_config if rank == 0 else lambda *_: ""
        adversarial = write(args, model, splits, split, [], out_dir)  # a resume needs it now
        inputs, view_ids, bad, cache_seconds = cache_inputs(args, build_model, model, splits,
                                                            hashes, cache, device)
        if bad:
            write(args, model, splits, split, bad, out_dir)
        history, best_epoch = [], 0
        if args.epochs > 0:
            select = inputs["test" if args.select_on == "test" else "val"]
            with torch.autocast("cuda", torch.bfloat16, enabled=args.amp):  # --amp: CUDA only
                history, best_epoch = train(model, inputs["train"], select, args, out_dir,
                                            checkpoint, view_ids)
            if rank == 0:
                load_checkpoint(f"{out_dir}/best.pt", model)
        if rank > 0:  # the other ranks are done: rank 0 evaluates and reports
            return None
        selection = ("test set (paper's protocol: the reported test accuracy is optimistic, "
                     "the test set chose the epoch)") if args.select_on == "test" else \
            "validation split"
        metrics = {"model": model.cache_key["model"], "seed": args.seed, "selection": selection,
                   "split": splits.source, "best_epoch": best_epoch, "epochs": args.epochs,
                   "seconds_per_epoch": float(np.median([h["seconds"] for h in history]))
                   if history else None, "cache_build_seconds": cache_seconds,
                   "cached": not args.no_cache, "undecodable_skipped": len(bad),
                   "adversarial_training": adversarial, "val": None}
        outputs = {name: (predict(part, args.batch_size)[0], part.labels.numpy())
                   for name, part in inputs.items() if len(part)}  # (logits, labels)
        if args.attack_eval:  # the chosen model under attack: the full network on [0, 1] pixels
            metrics.update(attacked_accuracy(model, inputs["test"], args))
        test_paths = [s.path for s in inputs["test"].samples]  # and their copies in training:
        leaky = data.test_paths_with_train_copy(  # whatever the split (SHA-1s read once)
            args.data, [s.path for name in ("train", "val") for s in inputs[name].samples],
            test_paths, args.cache_dir, hashes)
        if leaky and splits.source != "official" and not args.split:
            print("note: train and test share copies of images; `python data.py split "
                  "--leak-free` writes a split that keeps each group of copies in one part")
        notes = f"{len(bad)} undecodable image(s) skipped (--skip-bad): {', '.join(bad)}" if bad \
            else ""
        stats.report_run(out_dir, metrics, outputs, test_paths, leaky, model.class_names, history,
                         args.calibrate, notes)
        if cache is not None and cache.damaged:
            print(f"feature cache: {cache.damaged} damaged entries (checksum mismatch) "
                  f"recomputed in {cache.dir}")
    return metrics


def run(args, build_model, script, one_run=None, epochs=EPOCHS):
    """--benchmark, or one run (--resume: with its own options) by run_one or the script's own
    one_run; seeds are runs of their own (`stats.py summary RUN...`: mean +- std)."""
    args.script = script  # saved with the run: predict.py rebuilds the model with this script
    if args.benchmark:
        result = benchmark(build_model(args), pgd_steps=args.pgd_steps)
        print(json.dumps(result))
        return result
    args, recorded = resume_options(args) if args.resume else (args, None)
    args.epochs = epochs if args.epochs is None else args.epochs
    name = os.path.basename(os.path.normpath(getattr(args, "weights", None) or args.model))
    name = "-".join([script, name.removesuffix(".json")] + [x for x, default in (
        (getattr(args, "head", "cosine"), "cosine"), (args.loss, "ce"),
        (getattr(args, "train", "full"), "full")) if x != default])
    out_dir = args.out or f"runs/{name}-seed{args.seed}"
    if args.demo and not args.resume:  # the demo replaces its own earlier demo run only
        args.overwrite = args.overwrite or stats.run_config(out_dir)["args"].get("demo") is True
    try:
        return (one_run or run_one)(args, build_model, out_dir, recorded)
    except KeyboardInterrupt:  # before the folder was claimed (inside it, run_folder says more)
        raise SystemExit("error: stopped (Ctrl-C) before the run began; nothing was written")


# ---- benchmark ---------------------------------------------------------------------------------

def ms_per_image(timed, rounds, batch_size, digits=2):
    """{name: median ms per image} of the callables, called in turn (a, b, c, a, b, c, ...) so that
    other jobs' load hits all alike; round 0 (warm-up) is left out."""
    times = {name: [] for name in timed}
    for _ in range(rounds + 1):
        for name, fn in timed.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: round(1000 * float(np.median(t[1:])) / batch_size, digits)
            for name, t in times.items()}


def benchmark(model, batch_size=BATCH_SIZE, repeats=5, pgd_steps=PGD_STEPS):
    """ms per image of the stem, a naive step (whole network), a cached step, a cache read and an
    FGSM view; a PGD view is computed as pgd_steps FGSM views (timing it would take minutes)."""
    images = torch.rand(batch_size, 3, model.image_size, model.image_size)
    labels = torch.arange(batch_size) % model.n_classes
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    with torch.no_grad():
        features = model.eval().stem(images)
    cache = data.FeatureCache(tempfile.mkdtemp(), model)
    for i, feature in enumerate(features):
        cache.put(f"{i:040x}", 0, feature)

    def step(forward):
        loss = F.cross_entropy(forward(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timed = {"stem_ms": lambda: torch.no_grad()(model.stem)(images),
             "naive_ms": lambda: step(lambda: model(images)),
             "cached_ms": lambda: step(lambda: model.top(features)),
             "cache_read_ms": lambda: [cache.read(cache.path(f"{i:040x}", 0))
                                       for i in range(batch_size)],
             "fgsm_view_ms": lambda: attack(model, images, labels, 1, FGSM_EPS, FGSM_EPS)}
    model.train()
    result = ms_per_image(timed, repeats, batch_size)
    shutil.rmtree(os.path.dirname(cache.dir))
    return dict(result, naive_over_cached=round(result["naive_ms"] / result["cached_ms"], 2),
                pgd_view_ms_computed=round(pgd_steps * result["fgsm_view_ms"], 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                batch_size=batch_size, threads=torch.get_num_threads())


# ---- command line ------------------------------------------------------------------------------

class MovedToPredict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise SystemExit(f"error: {option_string} moved to predict.py: `python predict.py RUN "
                         f"IMAGES_DIR` classifies new images, `python predict.py RUN --explain` "
                         f"draws heat maps")


def make_parser(description, epochs=EPOCHS):
    """The options every script shares; each script adds its model's options."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    a = parser.add_argument
    a("--data", help="dataset folder: Training/ and Testing/ with class folders, or class folders")
    a("--split", help="split CSV (path,label,split), e.g. from `python data.py split --leak-free`")
    a("--seed", type=int, default=42, help="seed of the split, initialisation and batch order")
    a("--val-fraction", type=float, help=f"share of training images for validation (default "
      f"{VAL_FRACTION}; with --shots K: K images per class)")
    a("--select-on", choices=["val", "test"], default="val",
      help="split that picks the best epoch; 'test' is the paper's protocol (optimistic)")
    a("--epochs", type=int, help=f"training epochs (default {epochs}); 0 evaluates zero-shot; "
                                  f"with --resume, extends the run")
    a("--trainable-blocks", type=int, default=TRAINABLE_BLOCKS,
      help="vision blocks that train; 0 is a linear probe on frozen features")
    a("--shots", type=int, help="few-shot: train on K images per class (seeded)")
    a("--calibrate", action="store_true", help="fit temperature, class offsets and tumour "
                                               "threshold on validation logits (also zero-shot)")
    a("--batch-size", type=int, default=BATCH_SIZE, help="images per step")
    a("--lr", type=float, default=LEARNING_RATE, help="AdamW learning rate")
    a("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay")
    a("--warmup-epochs", type=float, default=WARMUP_EPOCHS, help="linear LR warm-up (epochs)")
    a("--loss", choices=["ce", "focal", "hybrid"], default="ce",
      help="cross-entropy (paper's code), focal, or hybrid = (ce + focal) / 2 (paper's text)")
    a("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    a("--views", type=int, default=VIEWS, help="views per training image: plain + augmented, "
      "fixed and shared by every seed (--no-cache: fresh ones every epoch)")
    a("--cache-dir", default="./cache", help="where the frozen stem's outputs are stored")
    a("--no-cache", action="store_true", help="run the full network every step (paper's way)")
    a("--adversarial", choices=["none", "fgsm", "pgd"], default="none", help="adversarial "
      "training: a cached view from the starting model, or each batch with --no-cache (paper)")
    a("--eps", type=float, default=FGSM_EPS, help="FGSM step and radius ([0, 1] pixels)")
    a("--pgd-steps", type=int, default=PGD_STEPS, help="PGD steps")
    a("--pgd-step-size", type=float, default=PGD_STEP_SIZE, help="PGD step size")
    a("--pgd-eps", type=float, default=PGD_EPS, help="radius of PGD's L-inf ball (see above)")
    a("--attack-eval", action="store_true", help="test accuracy under FGSM and PGD")
    a("--attack-n", type=int, help="attack a stratified subset of about N test images")
    a("--skip-bad", action="store_true", help="skip images that cannot be decoded (counted)")
    a("--out", help="run folder (default runs/<script>-<model>-seed<seed>)")
    a("--overwrite", action="store_true", help="replace the run in --out (kept in replaced/ "
      "until the new one completes; other files stay)")
    a("--resume", metavar="RUN_DIR", help="continue a stopped run in its own folder (not --out) "
      "with its own options; --data, --cache-dir, --device and a longer --epochs may be given")
    a("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    a("--amp", action="store_true", help="bfloat16 autocast in training (CUDA only)")
    a("--benchmark", action="store_true", help="time the steps at full size, random weights")
    a("--demo", action="store_true", help="offline demo: synthetic data, tiny random model")
    a("--predict", "--run", "--explain", "--n", "--images", "--explain-method", "--lesions",
      nargs="?", action=MovedToPredict, help=argparse.SUPPRESS)  # one way: predict.py
    return parser


def demo_defaults(args):
    """--demo's defaults (given options win): the synthetic dataset, written once, its own cache,
    20 epochs of 2 views at 1e-3."""
    demo_data = os.path.join(DEMO_DIR, "data-v3")  # v3: captions.csv (images as v2: a scalp)
    if not os.path.isdir(demo_data):
        data.write_synthetic_dataset(demo_data, per_class=60, seed=0)
    defaults = dict(data=demo_data, cache_dir=os.path.join(DEMO_DIR, "cache"), epochs=20,
                    views=2, lr=1e-3)  # it replaces only its own earlier run (run())
    if args.trainable_blocks == 0:  # a probe, as CLIP's: plain view, trained to convergence
        defaults.update(views=1, lr=1e-2, epochs=300, warmup_epochs=0)  # 0.07 s an epoch
    return defaults


def parse_args(parser, argv=None, model_demo_defaults=dict):
    """argv -> options; with --demo, argv parsed again over demo_defaults() and the script's
    model_demo_defaults() (its tiny random model)."""
    args = parser.parse_args(argv)
    if args.demo:
        os.makedirs(DEMO_DIR, exist_ok=True)
        parser.set_defaults(**{**demo_defaults(args), **model_demo_defaults()})
        args = parser.parse_args(argv)
        torch.set_num_threads(1)  # a tiny model gains nothing from a second thread
    unset = object()  # then the options argv names (for --resume): those not left unset
    parser.set_defaults(**dict.fromkeys(vars(args), unset))
    args.given = sorted(k for k, v in vars(parser.parse_args(argv)).items() if v is not unset)
    return args


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--model", default=MODEL,
                        help="open_clip architecture (e.g. ViT-B-16) or a .json model config")
    parser.add_argument("--pretrained", default=PRETRAINED,
                        help="open_clip tag (openai, ...), a local weights file, or none")
    parser.add_argument("--activation", choices=["gelu", "quickgelu"], help="the activation a "
                        "--pretrained FILE was trained with (a tag knows its own)")
    parser.add_argument("--head", choices=["cosine", "mlp", "linear", "fusion"],
                        default="cosine", help="cosine: scale x cosine(image, prompts) (paper's "
                        "method); mlp: 768->512->4 on CLS (paper's code); linear: 768->4; "
                        "fusion: MLP on [image, prompt] pairs. --epochs 0 (zero-shot) always "
                        "uses cosine: nothing is trained, the prompts are the head")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, lambda: dict(pretrained="none", model=stats.write_json(
        TINY_CONFIG, os.path.join(DEMO_DIR, "clip-tiny.json"))))
    return run(args, build_model, "clip")


if __name__ == "__main__":
    main()
