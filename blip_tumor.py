"""Fine-tune BLIP's vision encoder (last 2 blocks) to classify brain MRI into 4 classes.

    python blip_tumor.py --data ./merged --seed 42        # the paper's run (blip-itm-base-coco)
    python blip_tumor.py --demo                           # offline: synthetic data, tiny model
    python blip_tumor.py --benchmark                      # speeds at full size, random weights

clip_tumor.py's method on BLIP's ViT-B/16: logits = scale x ITC cosine(image, prompt), the text
encoder frozen. `--head itm`: the paper's "cross-attention" (ITM match per prompt); `--head mlp`:
its code (768->512->4 on CLS). `--benchmark` (224 px, 2-core CPU, GEMM ~130 GFLOP/s): 72.9 ms per
image cached (block 12: CLS only), 348.8 ms full. `--demo` (1 thread): 85.0 % test accuracy, 12 s.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor,
                          BlipProcessor)

import clip_tumor
import data
from clip_tumor import MLP_HIDDEN, PROMPT, PROMPT_NAMES, tensor_digest  # as CLIP's

WEIGHTS = "Salesforce/blip-itm-base-coco"  # Hugging Face id or local folder (save_pretrained)
IMAGE_SIZE = 224         # "resize to 224 x 224"; the checkpoint itself is 384
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, ids 0..4
USED_WEIGHTS = {"cosine": ("vision_model.", "vision_proj.", "text_proj.", "text_encoder."),
                "mlp": ("vision_model.",), "itm": ("vision_model.", "text_encoder.", "itm_head.")}

# A tiny BLIP for --demo and the tests (std 0.125 ~ width^-1/2: at 0.02 blocks barely mix tokens)
TINY_WIDTH = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4}
TINY_CONFIG = {"vision_config": {**TINY_WIDTH, "num_hidden_layers": 4, "image_size": 64,
                                 "patch_size": 8, "initializer_range": 0.125},
               "text_config": {**TINY_WIDTH, "num_hidden_layers": 2, "vocab_size": 32,
                               "max_position_embeddings": 32, "bos_token_id": 2, "sep_token_id": 3,
                               "eos_token_id": 3, "initializer_range": 1.0},  # 0.02: prompts alike
               "image_text_hidden_size": 32, "initializer_range": 0.125}


# ---- model -------------------------------------------------------------------------------------

def cls_only_layer(layer, tokens):
    """layer(tokens)[:, :1] of a BlipEncoderLayer without attention dropout, tokens (B, 1 + H*W, D):
    keys and values from all tokens, the query, attention and MLP for CLS alone (tested to 1e-5)."""
    attn, normed = layer.self_attn, layer.layer_norm1(tokens)
    query, keys, values = clip_tumor.fused_qkv(attn.qkv, attn.num_heads, normed, 1)
    attended = F.scaled_dot_product_attention(query, keys, values, scale=attn.scale)  # (B,nh,1,hd)
    cls = tokens[:, :1] + attn.projection(attended.transpose(1, 2).flatten(2))
    return cls + layer.mlp(layer.layer_norm2(cls))                       # (B, 1, D)


def resize_positions(embeddings, image_size):
    """BLIP's position table resized once for image_size, by transformers' own bicubic code."""
    shape = (1, 1 + (image_size // embeddings.patch_size) ** 2, embeddings.embed_dim)  # (1, T, D)
    table = embeddings.interpolate_pos_encoding(torch.zeros(shape), image_size, image_size)
    embeddings.position_embedding = nn.Parameter(table.detach(), requires_grad=False)


class BLIPClassifier(clip_tumor.FrozenStem):
    """BLIP's vision tower split into a frozen stem and a trainable top, plus a head."""

    def __init__(self, blip, processor, head, name, weights, image_size, trainable_blocks):
        mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
        super().__init__(mean, std, image_size)
        vision = blip.eval().requires_grad_(False).vision_model  # what trains is switched on below
        embeddings, layers = vision.embeddings, vision.encoder.layers
        width = embeddings.embed_dim                                     # D
        resize_positions(embeddings, image_size)
        assert vision.config.attention_dropout == 0, f"{name}: vision attention dropout must be 0"
        if not 0 <= trainable_blocks <= len(layers):
            raise SystemExit(f"error: --trainable-blocks {trainable_blocks}: 0 to {len(layers)}")
        self.head_type, self.vision = head, vision
        split = len(layers) - trainable_blocks  # trainable: the last blocks, post-LayerNorm, head
        self.stem_layers, self.top_layers = layers[:split], layers[split:].requires_grad_(True)
        vision.post_layernorm.requires_grad_(True)
        self.frozen_parts = [embeddings, self.stem_layers]  # a plain list: registered in vision
        self.cache_key = {  # what the stem reads, nothing a head trains: one cache for all heads
            "model": name, "weights": weights, "stem_blocks": split, "image_size": image_size,
            "mean": list(mean), "std": list(std), "vision_config": vision.config.to_dict(),
            "frozen_digest": tensor_digest(nn.ModuleList(self.frozen_parts).parameters())}

        prompts = [PROMPT.format(PROMPT_NAMES[c]) for c in self.class_names]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        self.register_buffer("prompt_ids", tokens["input_ids"])          # (C, L)
        self.register_buffer("prompt_mask", tokens["attention_mask"])    # (C, L), 0 = padding
        with torch.no_grad():  # ITC prompt embeddings (C, E): text encoder CLS -> text_proj
            text = blip.text_encoder(self.prompt_ids, self.prompt_mask).last_hidden_state[:, 0]
            self.register_buffer("class_prompts", F.normalize(blip.text_proj(text), dim=-1))
        if head == "cosine":  # BLIP's ITC temperature is not in the checkpoint: 1 / 0.07 to start
            self.vision_proj = blip.vision_proj.requires_grad_(True)
            self.logit_scale = nn.Parameter(torch.tensor(blip.config.logit_scale_init_value))
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, MLP_HIDDEN), nn.BatchNorm1d(MLP_HIDDEN),
                                      nn.ReLU(), nn.Linear(MLP_HIDDEN, self.n_classes))
        elif head == "itm":  # the text tower is kept only where the head reads it
            self.text_encoder, self.itm_head = blip.text_encoder, blip.itm_head.requires_grad_(True)
            self.frozen_parts.append(self.text_encoder)                  # frozen, gradients pass

    def stem(self, images):
        """The cached frozen part: (B, 1 + H*W, D) tokens entering the top, or CLS (B, 1, D)."""
        x = self.vision.embeddings((images - self.mean) / self.std)
        for layer in self.stem_layers:
            x = layer(x)
        return x if len(self.top_layers) or self.head_type == "itm" else x[:, :1]

    def top(self, tokens):
        """Stem tokens -> (B, C) logits, the last block for CLS alone (itm: every token)."""
        for i, layer in enumerate(self.top_layers, start=1):
            cls_only = i == len(self.top_layers) and self.head_type != "itm"
            tokens = cls_only_layer(layer, tokens) if cls_only else layer(tokens)
        return self.classify(self.vision.post_layernorm(tokens))

    def attention_blocks(self):
        return list(self.vision.encoder.layers)

    def explain_layer(self):  # Grad-CAM's activations: the tokens entering the last block
        return self.vision.encoder.layers[-1], "input"

    def forward(self, images):  # the paper's way: transformers' BlipVisionModel, every step
        return self.classify(self.vision((images - self.mean) / self.std).last_hidden_state)

    def classify(self, tokens):
        """(B, T, D) post-LayerNorm tokens (T = 1 when only CLS was computed) -> (B, C)."""
        if self.head_type == "mlp":
            return self.head(tokens[:, 0])
        if self.head_type == "cosine":  # BLIP's ITC score, scaled
            image = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)  # (B, E)
            return self.logit_scale.exp() * image @ self.class_prompts.t()
        # itm as BlipForImageTextRetrieval(use_itm_head=True): itm_head(text CLS)[:, 1] per prompt
        pairs = tokens.repeat_interleave(self.n_classes, dim=0)          # (B*C, 1 + H*W, D)
        ids, mask = self.prompt_ids.repeat(len(tokens), 1), self.prompt_mask.repeat(len(tokens), 1)
        text = self.text_encoder(ids, mask, encoder_hidden_states=pairs).last_hidden_state
        return self.itm_head(text[:, 0])[:, 1].view(len(tokens), self.n_classes)


# ---- weights -----------------------------------------------------------------------------------

def random_blip(**config):
    """A random BlipForImageTextRetrieval; its tokenizer knows the (lowercased) prompt words."""
    words = {word for c in data.CLASSES for word in PROMPT.format(PROMPT_NAMES[c]).lower().split()}
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(words))})
    processor = BlipProcessor(BlipImageProcessor(), tokenizer)  # only its mean and std are used
    return BlipForImageTextRetrieval(BlipConfig(**config)).eval(), processor


def write_tiny_weights(folder, make=lambda: random_blip(**TINY_CONFIG)):
    """make()'s random model and processor (seed 0) saved in folder for --weights (--demo)."""
    torch.manual_seed(0)
    for part in make():
        part.save_pretrained(folder)
    return folder


def build_model(args):
    """BLIPClassifier on --weights, refused where weights the head reads would start random."""
    clip_tumor.set_seed(args.seed)
    head = "cosine" if args.epochs == 0 and args.head == "mlp" else args.head  # zero-shot
    weights = "random" if args.benchmark else args.weights  # benchmark: full size, no download
    blip, processor = random_blip() if args.benchmark else load_blip(
        BlipForImageTextRetrieval, weights, USED_WEIGHTS[head], f"--head {head}", WEIGHTS)
    name = "blip-vit-b16" if args.benchmark else os.path.basename(os.path.normpath(weights))
    return BLIPClassifier(blip, processor, head, name, weights, args.image_size,
                          args.trainable_blocks)


def load_blip(model_class, weights, used, user, checkpoint):
    """(model_class weights, processor) of a hub id or save_pretrained folder, refused if a weight
    `user` reads (names starting with `used`) would start random (e.g. a caption decoder)."""
    path = os.path.expanduser(weights)
    if not os.path.isdir(path):  # a hub id
        clip_tumor.offline_unless_hub_answers()
    try:
        blip, info = model_class.from_pretrained(path, output_loading_info=True)
        processor = BlipProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:  # offline, no such folder, not a BLIP folder, ...
        raise SystemExit(f"error: --weights {weights}: cannot load BLIP ({error!r:.200}); pass a "
                         f"save_pretrained folder or `hf download {checkpoint} --local-dir DIR`")
    new = sorted(key for key in info["missing_keys"] if key.startswith(used))
    if new:
        raise SystemExit(f"error: --weights {weights}: {len(new)} weight(s) {user} reads would "
                         f"start random: {', '.join(new[:10])}; use e.g. {checkpoint}")
    return blip, processor


# ---- main --------------------------------------------------------------------------------------

def build_parser():
    parser = clip_tumor.make_parser(__doc__)
    parser.add_argument("--weights", default=WEIGHTS, help="Hugging Face id or local folder")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input size (paper 224)")
    parser.add_argument("--head", choices=["cosine", "mlp", "itm"], default="cosine", help="BLIP's "
                        "ITC score (paper), MLP on CLS (its code) or ITM; --epochs 0 mlp: cosine")
    return parser


def main(argv=None):
    args = clip_tumor.parse_args(build_parser(), argv, lambda: dict(  # --demo: the tiny BLIP
        image_size=64, weights=write_tiny_weights(os.path.join(clip_tumor.DEMO_DIR, "blip-tiny"))))
    return clip_tumor.run(args, build_model, "blip")


if __name__ == "__main__":
    main()
