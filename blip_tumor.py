"""Fine-tune BLIP's vision encoder (last 2 blocks) to classify brain MRI into 4 classes.

    python blip_tumor.py --data ./merged --seed 42        # the paper's run (blip-itm-base-coco)
    python blip_tumor.py --demo                           # offline: synthetic data, tiny model
    python blip_tumor.py --benchmark                      # speeds at full size, random weights

clip_tumor.py's method with BLIP's ViT-B/16 (BlipForImageTextRetrieval, blip-itm-base-coco): the
last 2 vision blocks, post-LayerNorm and `vision_proj` train; logits = scale x cosine(image,
prompts through the frozen text encoder), BLIP's ITC score. `--head mlp` is the paper's code
(768->512->4 on CLS); `--head itm` its "cross-attention": each class prompt's ITM "match" logit,
the prompt cross-attending to the image tokens. Images at 224 (the checkpoint's 384 position
table is interpolated once). Weights a head reads but the checkpoint lacks are refused.

Measured on a quiet 2-core CPU (median of 3 `--benchmark` runs, ViT-B/16 at 224): a cached step
(block 12 for the CLS query only) costs 49 ms per image against 226 ms for the full network.
`python blip_tumor.py --demo` (one thread of a busy 2-core CPU): 93.3% test accuracy in 18 s.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_tumor
import data
from clip_tumor import MLP_HIDDEN, PROMPT, PROMPT_NAMES  # the same prompts and MLP head as CLIP

WEIGHTS = "Salesforce/blip-itm-base-coco"  # Hugging Face id or local folder (save_pretrained)
IMAGE_SIZE = 224         # "resize to 224 x 224"; the checkpoint itself is 384
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, ids 0..4
# The weights each head reads (key prefixes; cosine skips the text encoder's cross-attention)
USED_WEIGHTS = {"cosine": ("vision_model.", "vision_proj.", "text_proj.", "text_encoder."),
                "mlp": ("vision_model.",),
                "itm": ("vision_model.", "text_encoder.", "itm_head.")}

# A tiny BLIP for --demo and the tests, loaded through --weights FOLDER like real weights. At
# std 0.125 ~ width^-1/2 (as open_clip); at transformers' 0.02 random blocks barely mix tokens.
TINY_CONFIG = {"vision_config": {"hidden_size": 64, "intermediate_size": 256,
                                 "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "image_size": 64, "patch_size": 8, "initializer_range": 0.125},
               "text_config": {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "max_position_embeddings": 32, "bos_token_id": 2, "sep_token_id": 3,
                               "eos_token_id": 3, "initializer_range": 1.0},  # 0.02: prompts alike
               "image_text_hidden_size": 32, "initializer_range": 0.125}


# ---- model -------------------------------------------------------------------------------------

def cls_only_layer(layer, tokens):
    """The CLS output of a BlipEncoderLayer: keys and values from all tokens (rows [D, 3D) of the
    fused qkv weight), query, attention output and MLP for CLS alone. Equal to layer(tokens)[:, :1]
    (a test checks 1e-5) as BLIP's vision attention has no dropout (BLIPClassifier asserts it)."""
    attn = layer.self_attn
    batch, n_tokens, width = tokens.shape
    normed = layer.layer_norm1(tokens)                                   # (B, 1 + H*W, D)
    query = F.linear(normed[:, :1], attn.qkv.weight[:width], attn.qkv.bias[:width])  # (B, 1, D)
    keys_values = F.linear(normed, attn.qkv.weight[width:], attn.qkv.bias[width:])  # (B, T, 2D)
    query = query.view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
    keys, values = keys_values.view(batch, n_tokens, 2, attn.num_heads, attn.head_dim) \
        .permute(2, 0, 3, 1, 4)                                          # 2 x (B, nh, T, hd)
    attended = F.scaled_dot_product_attention(query, keys, values, scale=attn.scale)
    cls = tokens[:, :1] + attn.projection(attended.transpose(1, 2).reshape(batch, 1, width))
    return cls + layer.mlp(layer.layer_norm2(cls))                       # (B, 1, D)


class BLIPClassifier(nn.Module):
    """BLIP's vision tower split into a frozen stem and a trainable top, plus a head."""

    def __init__(self, blip, processor, head, name, weights, image_size, trainable_blocks,
                 class_names=data.CLASSES):
        super().__init__()
        blip.eval().requires_grad_(False)
        self.class_names, self.n_classes = tuple(class_names), len(class_names)
        self.head_type, self.image_size = head, image_size
        vision, embeddings = blip.vision_model, blip.vision_model.embeddings
        assert vision.config.attention_dropout == 0, f"{name}: vision attention dropout is " \
            f"on; the cached stem and the CLS-only last layer assume none (exactness)"
        # the position table resized once for image_size, by transformers' own bicubic code
        n_tokens = 1 + (image_size // embeddings.patch_size) ** 2
        table = embeddings.interpolate_pos_encoding(
            torch.zeros(1, n_tokens, embeddings.embed_dim), image_size, image_size)
        embeddings.position_embedding = nn.Parameter(table.detach(), requires_grad=False)

        prompts = [PROMPT.format(PROMPT_NAMES.get(c, c)) for c in class_names]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():  # ITC prompt embeddings: text encoder CLS -> text_proj, normalised
            text = blip.text_encoder(input_ids=tokens["input_ids"],
                                     attention_mask=tokens["attention_mask"]).last_hidden_state
            class_prompts = F.normalize(blip.text_proj(text[:, 0]).float(), dim=-1)
        self.register_buffer("class_prompts", class_prompts)            # (C, E)
        self.vision = vision  # the text tower is kept only where the head reads it (itm)
        layers = vision.encoder.layers
        split = len(layers) - trainable_blocks
        self.stem_layers, self.top_layers = layers[:split], layers[split:]
        self.frozen_parts = [embeddings, self.stem_layers]  # a plain list: registered in vision
        mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

        # trainable: the last blocks, the post-LayerNorm, and what the head reads after them
        self.top_layers.requires_grad_(True)
        vision.post_layernorm.requires_grad_(True)
        if head == "cosine":
            self.vision_proj = blip.vision_proj.requires_grad_(True)
            # BLIP's ITC temperature is not in the transformers checkpoint: start at 1 / 0.07
            self.logit_scale = nn.Parameter(torch.tensor(blip.config.logit_scale_init_value))
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(vision.config.hidden_size, MLP_HIDDEN),
                                      nn.BatchNorm1d(MLP_HIDDEN), nn.ReLU(),
                                      nn.Linear(MLP_HIDDEN, self.n_classes))
        elif head == "itm":
            self.text_encoder = blip.text_encoder                        # frozen, gradients pass
            self.frozen_parts.append(self.text_encoder)
            self.itm_head = blip.itm_head.requires_grad_(True)
            self.register_buffer("prompt_ids", tokens["input_ids"])      # (C, L)
            self.register_buffer("prompt_mask", tokens["attention_mask"])  # (C, L), 0 = padding
        # what the stem reads, and nothing a head trains (logit_scale): one cache for every head
        stem_parameters = [*embeddings.parameters(), *self.stem_layers.parameters()]
        self.cache_key = {"model": name, "weights": weights, "stem_blocks": split,
                          "image_size": image_size, "mean": list(mean), "std": list(std),
                          "vision_config": vision.config.to_dict(),  # widths, heads, eps, ...
                          "frozen_digest": clip_tumor.tensor_digest(stem_parameters)}

    def train(self, mode=True):
        """Frozen parts stay in eval mode: the full path then equals the cached one."""
        super().train(mode)
        for part in self.frozen_parts:
            part.eval()
        return self

    def stem(self, images):
        """The frozen part: embeddings and the first blocks. (B, 1 + H*W, D), cached on disk."""
        assert not any(layer.training for layer in self.stem_layers), "stem not in eval mode"
        x = self.vision.embeddings((images - self.mean) / self.std)      # (B, 1 + H*W, D)
        for layer in self.stem_layers:
            x = layer(x)
        return x

    def top(self, tokens, cls_only=True):
        """Trainable part from cached stem tokens; the last block for CLS only (cls_only=False,
        for the benchmark, and the itm head, which reads every image token: on all tokens)."""
        if not len(self.top_layers):  # --trainable-blocks 0: a probe on the frozen features
            return self.classify(tokens)
        for layer in self.top_layers[:-1]:
            tokens = layer(tokens)
        last = self.top_layers[-1]
        if self.head_type == "itm" or not cls_only:
            return self.classify(last(tokens))
        return self.classify(cls_only_layer(last, tokens))

    def forward(self, images):
        """The paper's way: the whole vision transformer on every token, every step."""
        tokens = self.vision.embeddings((images - self.mean) / self.std)
        return self.classify(self.vision.encoder(inputs_embeds=tokens).last_hidden_state)

    def classify(self, tokens):
        """(B, T, D) output of the last block (T = 1 when only CLS was computed) -> (B, C)."""
        tokens = self.vision.post_layernorm(tokens)  # BlipVisionModel's last_hidden_state
        if self.head_type == "mlp":
            return self.head(tokens[:, 0])
        if self.head_type == "cosine":  # BLIP's ITC score, scaled
            image = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)  # (B, E)
            return self.logit_scale.exp() * image @ self.class_prompts.t()
        # itm, as BlipForImageTextRetrieval(use_itm_head=True): each prompt runs through the text
        # encoder, cross-attending to all image tokens; itm_head(text CLS)[:, 1] is its score
        batch, classes = len(tokens), self.n_classes
        pairs = tokens.repeat_interleave(classes, dim=0)                 # (B*C, 1 + H*W, D)
        text = self.text_encoder(input_ids=self.prompt_ids.repeat(batch, 1),       # (B*C, L)
                                 attention_mask=self.prompt_mask.repeat(batch, 1),
                                 encoder_hidden_states=pairs).last_hidden_state  # (B*C, L, Dt)
        return self.itm_head(text[:, 0])[:, 1].view(batch, classes)


# ---- weights -----------------------------------------------------------------------------------

def load_blip(weights, head):
    """BlipForImageTextRetrieval and its processor; refuses weights the head reads that the
    checkpoint lacks (BlipModel and captioning checkpoints: training would start from noise)."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval
    local = os.path.exists(weights) or weights.startswith((".", "/", "~"))
    try:
        blip, info = BlipForImageTextRetrieval.from_pretrained(os.path.expanduser(weights),
                                                               output_loading_info=True)
        processor = AutoProcessor.from_pretrained(os.path.expanduser(weights))
    except (OSError, ValueError) as error:
        folder = "./" + weights.split("/")[-1]
        fix = "pass a folder written by save_pretrained or `hf download`" if local else \
            f"offline? run `hf download {weights} --local-dir {folder}`, then --weights {folder}"
        raise SystemExit(f"error: --weights {weights}: cannot load BLIP ({type(error).__name__}: "
                         f"{str(error)[:200]}); {fix}")
    new = [key for key in sorted(info["missing_keys"]) if key.startswith(USED_WEIGHTS[head])
           and not (head == "cosine" and ".crossattention." in key)]
    if new:
        raise SystemExit(f"error: --weights {weights}: {len(new)} weight(s) that --head {head} "
                         f"reads are not in it and would start random: {', '.join(new[:10])}"
                         f"{' ...' if len(new) > 10 else ''}; use an image-text retrieval "
                         f"checkpoint such as {WEIGHTS} (BlipModel and captioning ones lack them)")
    return blip, processor


def random_blip(**config):
    """A random-weight BlipForImageTextRetrieval, its tokenizer knowing only the prompt words."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, \
        BlipImageProcessor, BlipProcessor
    config = BlipConfig(**config)
    prompts = [PROMPT.format(PROMPT_NAMES[c]).lower() for c in data.CLASSES]  # BERT lowercases
    words = sorted({word for prompt in prompts for word in prompt.split()})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL_TOKENS + words)})
    processor = BlipProcessor(BlipImageProcessor(), tokenizer)  # only its mean and std are used
    return BlipForImageTextRetrieval(config).eval(), processor


def write_tiny_weights(folder, seed=0):
    """Save the tiny random BLIP and its processor with save_pretrained, for --weights FOLDER."""
    torch.manual_seed(seed)
    blip, processor = random_blip(**TINY_CONFIG)
    blip.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_model(args):
    clip_tumor.set_seed(args.seed)
    head = "cosine" if args.epochs == 0 and args.head == "mlp" else args.head  # zero-shot
    if args.benchmark:  # full-size BLIP ViT-B/16, random weights: nothing to download
        blip, processor = random_blip()
        name, weights = "blip-vit-b16", "random"
    else:
        blip, processor = load_blip(args.weights, head)
        name, weights = os.path.basename(os.path.normpath(args.weights)), args.weights
    return BLIPClassifier(blip, processor, head, name, weights, args.image_size,
                          args.trainable_blocks)


# ---- main --------------------------------------------------------------------------------------

def main(argv=None):
    parser = clip_tumor.make_parser(__doc__)
    parser.add_argument("--weights", default=WEIGHTS,
                        help="BlipForImageTextRetrieval weights: Hugging Face id or local folder")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="input size (paper: 224; blip-itm-base-coco's own: 384)")
    parser.add_argument("--head", choices=["cosine", "mlp", "itm"], default="cosine",
                        help="cosine: BLIP's ITC, scaled (paper's method); mlp: 768->512->4 on "
                             "CLS (paper's code); itm: ITM match logit of each class prompt")
    # --demo: a tiny random-weight BLIP written into the demo folder, 64 px images
    args = clip_tumor.parse_args(parser, argv, image_size=64, weights=lambda workdir:
                                 write_tiny_weights(os.path.join(workdir, "blip-tiny")))
    return clip_tumor.run(args, build_model, "blip")


if __name__ == "__main__":
    main()
