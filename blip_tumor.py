"""Fine-tune BLIP's vision encoder (last 2 blocks) to classify brain MRI into 4 classes.

    python blip_tumor.py --data ./merged --seed 42        # the paper's run (blip-itm-base-coco)
    python blip_tumor.py --demo                           # offline: synthetic data, tiny model
    python blip_tumor.py --benchmark                      # speeds at full size, random weights

The method (Swetha & Kumar, "Multimodal Brain Tumor Classification Using BLIP and CLIP"), as
clip_tumor.py with BLIP's ViT-B/16: everything frozen but the last 2 vision blocks, the vision
post-LayerNorm and `vision_proj`; the text encoder is frozen and the prompts "a photo of a {class}
brain MRI" are encoded once through it and `text_proj`; logits = learnable scale x cosine(image
embedding, prompt embeddings), BLIP's image-text contrastive (ITC) score. `--head mlp` is the
paper's code reading (Linear 768->512, BatchNorm, ReLU, Linear 512->4 on CLS features) and
`--head itm` its "cross-attention" reading: each class prompt goes through BLIP's image-grounded
text encoder attending to the image tokens, and the image-text matching (ITM) head's "match" logit
is that class's score. Images at 224 x 224 as the paper says (the checkpoint's 384 x 384 position
embeddings are interpolated once at load time); `--image-size 384` for the native size.
AdamW 3e-4, warm restarts T_0=5, 30 epochs, batch 16 (engine.py).

Weights: `BlipForImageTextRetrieval` from Salesforce/blip-itm-base-coco, which holds the trained
ITC projections and ITM head. `BlipModel` or the captioning checkpoints leave them (and the text
encoder) randomly initialised (transformers issue 28034, salesforce/BLIP issue 174); this script
refuses to train on any newly initialised weight its head uses, and lists them.

As in clip_tumor.py the frozen 10 blocks run once per image and view (the feature cache); a step
runs block 11 on all tokens and block 12 for the CLS query only (`itm` needs every image token,
so there block 12 runs in full). Measured on a quiet 2-core CPU (README, BLIP section; median of 3
`--benchmark` runs, ViT-B/16 at 224): a cached CLS-only step costs 49 ms per image against 226 ms
for the full network; `--demo` reaches 96.7% test accuracy in 9 s.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import engine
from clip_tumor import MLP_HIDDEN, PROMPT, PROMPT_NAMES  # the same prompts and MLP head as CLIP

WEIGHTS = "Salesforce/blip-itm-base-coco"  # Hugging Face id or local folder (save_pretrained)
IMAGE_SIZE = 224                # "resize to 224 x 224"; the checkpoint itself is 384
TRAINABLE_BLOCKS = 2            # "unfreeze vision encoder last 2 layers"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, ids 0..4

# A tiny BLIP for --demo and the tests: same code paths, random weights, seconds to train. It is
# saved with save_pretrained and loaded back through --weights FOLDER, exactly as real weights.
# Initialised at std 0.125 ~ width^-1/2 (as open_clip does): at transformers' 0.02 the random
# blocks barely mix tokens and the demo needs many more epochs to learn.
TINY_CONFIG = {"vision_config": {"hidden_size": 64, "intermediate_size": 256,
                                 "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "image_size": 64, "patch_size": 8, "initializer_range": 0.125},
               "text_config": {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "max_position_embeddings": 32, "bos_token_id": 2,
                               "sep_token_id": 3, "eos_token_id": 3,
                               "initializer_range": 1.0},  # at 0.02 all 4 prompts embed alike
               "image_text_hidden_size": 32, "initializer_range": 0.125}


# ---- model -------------------------------------------------------------------------------------

def cls_only_layer(layer, tokens):
    """The CLS output of a transformers BlipEncoderLayer, computing only what CLS needs.

    Keys and values still come from all tokens (the fused qkv weight is split: rows [0, D) make
    the query, [D, 3D) keys and values), but the query, attention output and MLP run on one token
    instead of 1 + H*W. Equal to layer(tokens)[:, :1] (a test checks 1e-5); BLIP's vision
    attention dropout is 0, so there is none here either.
    """
    attn = layer.self_attn
    batch, n_tokens, width = tokens.shape
    normed = layer.layer_norm1(tokens)                                   # (B, 1 + H*W, D)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query = F.linear(normed[:, :1], weight[:width], bias[:width])        # (B, 1, D)
    keys_values = F.linear(normed, weight[width:], bias[width:])         # (B, 1 + H*W, 2D)
    query = query.view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
    keys, values = keys_values.view(batch, n_tokens, 2, attn.num_heads, attn.head_dim) \
        .permute(2, 0, 3, 1, 4)                                          # 2 x (B, nh, T, hd)
    attended = F.scaled_dot_product_attention(query, keys, values, scale=attn.scale)
    cls = tokens[:, :1] + attn.projection(attended.transpose(1, 2).reshape(batch, 1, width))
    return cls + layer.mlp(layer.layer_norm2(cls))                       # (B, 1, D)


def resize_position_embedding(position_embedding, grid):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic on the patch grid, CLS position kept.

    The same arithmetic as transformers' BlipVisionEmbeddings.interpolate_pos_encoding (a test
    compares them), done once at load time so the stem and the full forward see one table.
    """
    cls, patches = position_embedding[:, :1], position_embedding[:, 1:]
    old_grid, width = math.isqrt(patches.shape[1]), patches.shape[2]
    if old_grid == grid:
        return position_embedding
    patches = patches.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1)


class BLIPClassifier(nn.Module):
    """BLIP's vision tower split into a frozen stem and a trainable top, plus a head."""

    def __init__(self, blip, processor, head, name, weights, image_size,
                 class_names=data.CLASSES):
        super().__init__()
        blip.eval().requires_grad_(False)
        self.class_names = tuple(class_names)
        self.n_classes = len(class_names)
        self.head_type = head
        vision = blip.vision_model
        embeddings = vision.embeddings
        if image_size % embeddings.patch_size:
            raise SystemExit(f"--image-size {image_size}: must be a multiple of the patch size "
                             f"{embeddings.patch_size}")
        grid = image_size // embeddings.patch_size
        embeddings.position_embedding = nn.Parameter(
            resize_position_embedding(embeddings.position_embedding.detach(), grid),
            requires_grad=False)
        embeddings.image_size, embeddings.num_patches = image_size, grid * grid
        embeddings.num_positions = grid * grid + 1
        self.image_size = image_size

        prompts = [PROMPT.format(PROMPT_NAMES.get(c, c)) for c in class_names]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():  # ITC prompt embeddings: text encoder CLS -> text_proj, normalised
            text = blip.text_encoder(input_ids=tokens["input_ids"],
                                     attention_mask=tokens["attention_mask"]).last_hidden_state
            class_prompts = F.normalize(blip.text_proj(text[:, 0]).float(), dim=-1)
        self.register_buffer("class_prompts", class_prompts)            # (C, E)
        self.vision = vision  # the text tower is kept only where the head reads it (itm)
        layers = vision.encoder.layers
        self.stem_layers, self.top_layers = layers[:-TRAINABLE_BLOCKS], layers[-TRAINABLE_BLOCKS:]
        image_processor = processor.image_processor
        mean, std = list(image_processor.image_mean), list(image_processor.image_std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

        # trainable: the last 2 blocks, the post-LayerNorm, and what the head reads after them
        self.top_layers.requires_grad_(True)
        vision.post_layernorm.requires_grad_(True)
        width = vision.config.hidden_size
        if head == "cosine":
            self.vision_proj = blip.vision_proj.requires_grad_(True)
            # BLIP's ITC temperature is not in the transformers checkpoint: start at 1 / 0.07
            self.logit_scale = nn.Parameter(torch.tensor(blip.config.logit_scale_init_value))
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, MLP_HIDDEN), nn.BatchNorm1d(MLP_HIDDEN),
                                      nn.ReLU(), nn.Linear(MLP_HIDDEN, self.n_classes))
        elif head == "itm":
            self.text_encoder = blip.text_encoder                        # frozen, gradients pass
            self.itm_head = blip.itm_head.requires_grad_(True)
            self.register_buffer("prompt_ids", tokens["input_ids"])      # (C, L)
            self.register_buffer("prompt_mask", tokens["attention_mask"])  # (C, L), 0 = padding
        stem_parameters = list(embeddings.parameters()) + list(self.stem_layers.parameters())
        self.cache_key = {"model": name, "weights": weights, "stem_blocks": len(self.stem_layers),
                          "image_size": image_size, "mean": mean, "std": std,
                          "augmentation": data.AUGMENTATION_ID,
                          "frozen_digest": engine.tensor_digest(stem_parameters)}

    def train(self, mode=True):
        """Frozen parts stay in eval mode (no dropout): the full path then equals the cached one."""
        super().train(mode)
        self.vision.embeddings.eval()
        self.stem_layers.eval()
        if self.head_type == "itm":
            self.text_encoder.eval()
        return self

    def embed(self, images):
        """Pixels in [0, 1] -> patch + CLS tokens with positions, as transformers' forward does."""
        return self.vision.embeddings((images - self.mean) / self.std)   # (B, 1 + H*W, D)

    def stem(self, images):
        """The frozen part: embeddings and the first blocks. (B, 1 + H*W, D), cached on disk."""
        x = self.embed(images)
        for layer in self.stem_layers:
            x = layer(x)
        return x

    def top(self, tokens, cls_only=True):
        """Trainable part from cached stem tokens: all blocks but the last on all tokens, the
        last for CLS only (cls_only=False runs it on all tokens, for the benchmark). The itm head
        cross-attends to every image token, so there the last block always runs in full."""
        for layer in self.top_layers[:-1]:
            tokens = layer(tokens)
        last = self.top_layers[-1]
        if self.head_type == "itm" or not cls_only:
            return self.classify(last(tokens))
        return self.classify(cls_only_layer(last, tokens))

    def forward(self, images):
        """The paper's way: the whole vision transformer on every token, every step."""
        return self.classify(self.vision.encoder(inputs_embeds=self.embed(images))
                             .last_hidden_state)

    def classify(self, tokens):
        """(B, T, D) output of the last block (T = 1 when only CLS was computed) -> (B, C)."""
        tokens = self.vision.post_layernorm(tokens)  # BlipVisionModel's last_hidden_state
        if self.head_type == "itm":
            return self.itm_scores(tokens)
        if self.head_type == "mlp":
            return self.head(tokens[:, 0])
        image = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)      # (B, E)
        return self.logit_scale.exp() * image @ self.class_prompts.t()  # cosine (ITC) head

    def itm_scores(self, image_tokens):
        """ITM "match" logit of every (image, class prompt) pair, as BlipForImageTextRetrieval
        with use_itm_head=True: the prompt runs through the text encoder, whose cross-attention
        reads all image tokens; itm_head(text CLS)[:, 1] is the score. (B, 1 + H*W, D) -> (B, C)."""
        batch, classes = len(image_tokens), self.n_classes
        pairs = image_tokens.repeat_interleave(classes, dim=0)           # (B*C, 1 + H*W, D)
        text = self.text_encoder(input_ids=self.prompt_ids.repeat(batch, 1),       # (B*C, L)
                                 attention_mask=self.prompt_mask.repeat(batch, 1),
                                 encoder_hidden_states=pairs).last_hidden_state  # (B*C, L, Dt)
        return self.itm_head(text[:, 0])[:, 1].view(batch, classes)


# ---- weights -----------------------------------------------------------------------------------

def load_blip(weights):
    """BlipForImageTextRetrieval, its processor, and the weights it had to initialise randomly."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval
    weights = os.path.expanduser(weights)
    local = os.path.isdir(weights)
    if not local and weights.startswith((".", "/", "~")):
        raise SystemExit(f"--weights {weights}: no such folder")
    try:
        blip, info = BlipForImageTextRetrieval.from_pretrained(weights, output_loading_info=True)
        processor = AutoProcessor.from_pretrained(weights)
    except OSError as error:
        if local:
            raise
        raise SystemExit(
            f"could not obtain the BLIP weights '{weights}' ({type(error).__name__}: "
            f"{str(error)[:200]}).\nThis machine is probably offline. Either run once where the "
            f"internet is reachable (transformers caches the weights in ~/.cache/huggingface), "
            f"or download them on such a machine:\n    hf download {weights} --local-dir "
            f"./{weights.split('/')[-1]}\n(huggingface_hub < 1.0: huggingface-cli download ...), "
            f"copy the folder here and pass --weights ./{weights.split('/')[-1]}")
    return blip, processor, sorted(info["missing_keys"])


def weights_used(key, head):
    """Does `head` read this BlipForImageTextRetrieval weight (then it must come from the file)?"""
    if key.startswith("vision_model."):
        return True
    if head == "cosine":  # ITC: vision_proj, and the text encoder without cross-attention
        return key.startswith(("vision_proj.", "text_proj.")) or \
            key.startswith("text_encoder.") and ".crossattention." not in key
    if head == "itm":     # ITM: the image-grounded text encoder and the match head
        return key.startswith(("text_encoder.", "itm_head."))
    return False


def refuse_new_weights(missing_keys, head, weights):
    """Stop when a weight the method uses was newly initialised: training would start from noise
    (the BlipModel / captioning-checkpoint trap: cosine similarity needs trained projections)."""
    new = [key for key in missing_keys if weights_used(key, head)]
    if new:
        shown = "\n    ".join(new[:20]) + (f"\n    ... and {len(new) - 20} more"
                                             if len(new) > 20 else "")
        raise SystemExit(
            f"--weights {weights}: {len(new)} weight(s) that --head {head} uses are not in the "
            f"checkpoint and would be randomly initialised:\n    {shown}\nUse a BLIP image-text "
            f"retrieval checkpoint (e.g. {WEIGHTS}); captioning checkpoints and BlipModel lack "
            f"the ITC projections and the text encoder.")


def random_blip(config):
    """A BlipForImageTextRetrieval with random weights and a processor whose tokenizer knows only
    the prompt words (the tiny demo model, and the full-size model for --benchmark)."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval, BlipImageProcessor, \
        BlipProcessor
    prompts = [PROMPT.format(PROMPT_NAMES[c]) for c in data.CLASSES]
    words = sorted({word for prompt in prompts for word in prompt.lower().split()})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL_TOKENS + words)})
    size = config.vision_config.image_size
    processor = BlipProcessor(BlipImageProcessor(size={"height": size, "width": size}), tokenizer)
    return BlipForImageTextRetrieval(config).eval(), processor


def write_tiny_weights(folder, seed=0):
    """Save the tiny random BLIP and its processor with save_pretrained, for --weights FOLDER."""
    from transformers import BlipConfig
    torch.manual_seed(seed)
    blip, processor = random_blip(BlipConfig(**TINY_CONFIG))
    blip.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_model(args):
    engine.set_seed(args.seed)
    head = "cosine" if args.epochs == 0 and args.head == "mlp" else args.head  # zero-shot
    if args.benchmark:  # full-size BLIP ViT-B/16, random weights: nothing to download
        from transformers import BlipConfig
        blip, processor = random_blip(BlipConfig())
        return BLIPClassifier(blip, processor, head, "blip-vit-b16", "random", args.image_size)
    blip, processor, missing = load_blip(args.weights)
    refuse_new_weights(missing, head, args.weights)
    name = os.path.basename(os.path.normpath(args.weights))
    return BLIPClassifier(blip, processor, head, name, args.weights, args.image_size)


# ---- main --------------------------------------------------------------------------------------

def demo_arguments(workdir, args):
    """Synthetic data and a tiny random-weight BLIP: the whole pipeline offline in a few minutes."""
    data_dir, weights = os.path.join(workdir, "data"), os.path.join(workdir, "blip-tiny")
    if not os.path.isdir(data_dir):
        data.write_synthetic_dataset(data_dir, per_class=60, seed=0)
    write_tiny_weights(weights)
    return ["--data", data_dir, "--weights", weights, "--image-size", "64", "--views", "2",
            "--lr", "1e-3", "--cache-dir", os.path.join(workdir, "cache"),
            "--out", "runs/blip-demo", "--overwrite"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=WEIGHTS,
                        help="BlipForImageTextRetrieval weights: a Hugging Face id or a local "
                             "folder written by save_pretrained / `hf download`")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="input size; position embeddings are interpolated from the "
                             "checkpoint's (384 for blip-itm-base-coco, its native size)")
    parser.add_argument("--head", choices=["cosine", "mlp", "itm"], default="cosine",
                        help="cosine: scale x cosine(image, prompts), BLIP's ITC (paper's method "
                             "text); mlp: 768->512->4 on CLS (paper's code); itm: ITM match "
                             "logit of each prompt cross-attending to the image (paper's fusion "
                             "section)")
    engine.add_arguments(parser, default_out="runs/blip-<weights>-seed<seed>")
    return parser.parse_args(argv)


def main(argv=None):
    run_name = lambda args: "blip-" + os.path.basename(os.path.normpath(args.weights))
    return engine.main(argv, parse_args, build_model, demo_arguments, run_name)


if __name__ == "__main__":
    main()
