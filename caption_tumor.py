"""Caption brain MRI the MedBLIP way: fine-tune BLIP's captioner, then score what it writes.

    python caption_tumor.py --data ./merged --seed 42     # blip-image-captioning-base, all trains
    python caption_tumor.py --demo                        # offline: synthetic captions, tiny BLIP
    python caption_tumor.py --demo --train decoder        # vision encoder frozen, its tokens cached
    python caption_tumor.py --demo --epochs 0             # zero-shot: the captioner as loaded
    python caption_tumor.py --benchmark                   # ms per image: cached decoder vs full

MedBLIP (Phan et al. 2024) fine-tunes transformers' BlipForConditionalGeneration (blip-image-
captioning-base, 224 px, AdamW 1e-5, 15 epochs) on its teacher-forced LM loss and writes by beam
search; the ROCO study (2025) found full fine-tuning best, decoder-only (encoder frozen) close.
Captions: DATA/captions.csv (path,caption) or --captions, else the class's template. Scores
(stats.py, = pycocoevalcap): BLEU-1..4, ROUGE-L, CIDEr-D, and whether a caption names the class.
Training is clip_tumor.py's loop and LR schedule (not MedBLIP's StepLR). `--demo` (2-core CPU, one
thread): class accuracy / BLEU-4 0.933 / 0.887 with --train decoder, 0.917 / 0.845 with full.
"""
import argparse
import csv
import json
import os
import resource

import numpy as np
import torch
import torch.nn as nn
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                          BlipImageProcessor, BlipProcessor)

import blip_tumor
import clip_tumor
import data
import stats
from clip_tumor import tensor_digest

# ---- defaults: MedBLIP's choices ---------------------------------------------------------------
WEIGHTS = "Salesforce/blip-image-captioning-base"  # MedBLIP's BLIP base: hub id or local folder
IMAGE_SIZE = 224         # "Input image were resized to 224 x 224" (the checkpoint itself: 384)
TRAIN = "full"           # the ROCO study: full fine-tuning best, decoder-only ~5 % less time
EPOCHS = 15              # BLIP base: "training was conducted over 15 epochs"
LEARNING_RATE = 1e-5     # "initial learning rate of 1e-5", AdamW
BEAMS = 3                # beam search 3 gave BLIP base its best BLEU (1 = greedy)
NO_REPEAT_NGRAM = 3      # every generation setting used no_repeat_ngram_size = 3
MAX_LENGTH = 40          # tokens a generated caption may have, [DEC] included
VIEWS = 1                # the plain image only: MedBLIP names no augmentation, and a flip would
                         # swap the left and right that captions name
TEXT_LENGTH = 200        # training captions cut at 200 tokens ("maximum length of text input")
LABEL_SMOOTHING = 0.1    # BLIP's LM loss (salesforce/BLIP med.py); transformers 5 reads it from
                         # the config, where it defaults to 0, so it is set on the model below
CLASS_TERMS = {"glioma": ("glioma",), "meningioma": ("meningioma",),  # words naming a class
               "notumor": ("no tumor", "no tumour", "normal"), "pituitary": ("pituitary",)}
SPECIAL_TOKENS = blip_tumor.SPECIAL_TOKENS + ["[DEC]"]  # BERT's, then BLIP's caption start
TINY_WIDTH = blip_tumor.TINY_WIDTH  # a tiny BLIP captioner for --demo and the tests, as BLIP's
TINY_CONFIG = {"vision_config": {**TINY_WIDTH, "num_hidden_layers": 4, "image_size": 64,
                                 "patch_size": 8, "initializer_range": 0.125},
               "text_config": {**TINY_WIDTH, "num_hidden_layers": 2, "max_position_embeddings": 64,
                               "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3,
                               "bos_token_id": 5}}
DEMO = {"epochs": 40, "lr": 2e-3, "views": VIEWS, "beams": 1, "max_length": 16}  # --demo's own

# ---- model -------------------------------------------------------------------------------------

class Captioner(clip_tumor.FrozenStem):
    """BlipForConditionalGeneration with the part --train names trainable. --train decoder: the
    vision encoder is frozen and is the feature cache's stem; its tokens are read from disk."""

    def __init__(self, blip, processor, train_part, name, weights, image_size):
        mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
        super().__init__(mean, std, image_size)
        self.blip, self.tokenizer = blip, processor.tokenizer
        vision, text = blip.vision_model, blip.config.text_config
        assert vision.config.attention_dropout == 0, f"{name}: vision attention dropout must be 0"
        blip_tumor.resize_positions(vision.embeddings, image_size)  # trains again with the encoder
        blip.text_decoder.label_smoothing = LABEL_SMOOTHING
        self.special = {"bos": text.bos_token_id, "sep": text.sep_token_id,
                        "pad": text.pad_token_id}
        blip.requires_grad_(False)
        trained = {"decoder": blip.text_decoder, "encoder": vision, "full": blip}[train_part]
        trained.requires_grad_(True)
        self.frozen_parts = [part for part in (vision, blip.text_decoder) if part is not trained
                             and trained is not blip]
        self.cache_key = {"model": name, "weights": weights, "image_size": image_size,
                          "mean": list(mean), "std": list(std), "vision": vision.config.to_dict(),
                          "frozen_digest": tensor_digest(vision.parameters())}

    def stem(self, pixels):
        """(B, 3, S, S) in [0, 1] -> (B, 1 + H*W, D) vision tokens, CLS first: all the decoder
        sees of an image, so with the encoder frozen they are computed once and cached."""
        return self.blip.vision_model((pixels - self.mean) / self.std).last_hidden_state

    def caption_loss(self, image_tokens, ids, mask):
        """transformers' own LM loss of the decoder on image tokens: cross-entropy of each next
        token (label smoothing 0.1), padding ignored (-100), mean over the caption tokens."""
        return self.blip.text_decoder(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(
            mask == 0, -100), encoder_hidden_states=image_tokens).loss

    def forward(self, pixels, ids, mask):
        """The same loss by BlipForConditionalGeneration.forward: the vision encoder every step."""
        return self.blip(pixel_values=(pixels - self.mean) / self.std, input_ids=ids,
                         attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    @torch.no_grad()
    def generate(self, image_tokens, beams, max_length):
        """(B, T) ids, [DEC] first, of the captions BlipForConditionalGeneration.generate writes
        from the pixels behind image_tokens (a test compares); padded after [SEP]."""
        start = torch.full((len(image_tokens), 1), self.special["bos"], device=image_tokens.device)
        return self.blip.text_decoder.generate(
            input_ids=start, encoder_hidden_states=image_tokens, encoder_attention_mask=torch.ones(
                image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device),
            eos_token_id=self.special["sep"], pad_token_id=self.special["pad"], do_sample=False,
            num_beams=beams, max_length=max_length, no_repeat_ngram_size=NO_REPEAT_NGRAM)

    def decode(self, ids):
        """Generated ids -> captions as scored: lower case, no punctuation ([DEC] dropped)."""
        texts = self.tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)
        return [stats.caption_words(text) for text in texts]

    def tokenize(self, captions):
        """(ids, mask), each (N, L): [DEC] in place of [CLS], as BLIP's decoder reads a caption."""
        limit = min(TEXT_LENGTH, self.blip.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(captions, padding="longest", truncation=True, max_length=limit,
                                return_tensors="pt")
        ids = tokens["input_ids"].clone()
        ids[:, 0] = self.special["bos"]
        return ids, tokens["attention_mask"]


def random_blip(**config):
    """A random BlipForConditionalGeneration (full size without config) and its processor; the
    tokenizer knows every word of the synthetic captions (each size and place) and [DEC]."""
    boxes = [(x, y, x + w, y + w) for x in (0, 40, 80) for y in (0, 40, 80) for w in (8, 20, 30)]
    words = {word for name in data.CLASSES for box in boxes + [None]
             for word in data.synth_caption(name, box).split()}
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(words))},
                              bos_token="[DEC]")
    if config:  # the tiny model: its vocabulary is the tokenizer's
        config = dict(config, text_config=dict(config["text_config"], vocab_size=len(tokenizer)))
    blip = BlipForConditionalGeneration(BlipConfig(**config)).eval()
    return blip, BlipProcessor(BlipImageProcessor(), tokenizer)  # processor: mean, std, words


def write_tiny_weights(folder):
    """The tiny random captioner and its processor, saved for --weights FOLDER (--demo, tests)."""
    return blip_tumor.write_tiny_weights(folder, lambda: random_blip(**TINY_CONFIG))


def build_model(args):
    """Captioner on --weights; --benchmark: full-size random weights, nothing downloaded."""
    clip_tumor.set_seed(args.seed)
    if args.benchmark:
        return Captioner(*random_blip(), args.train, "blip-base", "random", args.image_size)
    blip, processor = blip_tumor.load_blip(BlipForConditionalGeneration, args.weights, (
        "vision_model", "text_decoder"), "the captioner", WEIGHTS)
    name = os.path.basename(os.path.normpath(args.weights))
    return Captioner(blip, processor, args.train, name, args.weights, args.image_size)


# ---- for predict.py: captions and cross-attention maps of new images ---------------------------

@torch.no_grad()
def run_tokens(model, pixels, options):
    """Vision tokens of view-0 pixels along the run's own path: a cached run's were stored fp16."""
    tokens = model.eval().stem(pixels.to(model.mean.device))
    return tokens.half().float() if options.train == "decoder" and not options.no_cache else tokens


def describe(model, pixels, options):
    """Captions of view-0 pixels (B, 3, S, S) in [0, 1], with the run's beams and max length."""
    tokens = run_tokens(model, pixels, options)
    return model.decode(model.generate(tokens, options.beams, options.max_length))


@torch.no_grad()
def cross_attention_maps(model, pixels, options):
    """((B, h, w) maps, captions): the decoder's cross-attention on the image patches (CLS
    dropped), mean over layers and heads, of the step that generated the caption's first class
    word (its query: the position before the word), else the mean over every generating step."""
    tokens = run_tokens(model, pixels, options)
    ids = model.generate(tokens, options.beams, options.max_length)     # (B, T), [DEC] first
    mask = (ids != model.special["pad"]).long()
    attentions = model.blip.text_decoder(input_ids=ids, attention_mask=mask, output_attentions=True,
                                         encoder_hidden_states=tokens).cross_attentions
    attention = torch.stack(attentions).mean((0, 2))[..., 1:]            # (B, T, H*W)
    terms = [model.tokenizer(term, add_special_tokens=False)["input_ids"]
             for name in data.CLASSES for term in CLASS_TERMS[name]]
    maps = []
    for row, weights, length in zip(ids.tolist(), attention, mask.sum(1).tolist()):
        starts = [t for t in range(1, length) for term in terms if row[t:t + len(term)] == term]
        steps = [min(starts) - 1] if starts else list(range(max(length - 1, 1)))
        maps.append(weights[steps].mean(0))
    side = int(round(attention.shape[-1] ** 0.5))
    return torch.stack(maps).view(len(ids), side, side).cpu().numpy(), model.decode(ids)


# ---- data: captions ----------------------------------------------------------------------------

def read_captions(args, samples):
    """{path: caption} from --captions or DATA/captions.csv (path,caption; paths relative to
    --data); an image without one gets its class's template (data.synth_caption), said once."""
    path, table = args.captions or os.path.join(args.data, "captions.csv"), {}
    if args.captions or os.path.isfile(path):
        try:
            with open(path, newline="") as f:
                table = {row["path"]: row["caption"] for row in csv.DictReader(f)}
        except (OSError, KeyError, csv.Error) as error:
            raise SystemExit(f"error: {path}: cannot read captions ({error!r}); need a CSV with "
                             f"columns path,caption, paths relative to --data")
    missing = [s for s in samples if not table.get(s.path)]
    if missing:
        print(f"note: {len(missing)} of {len(samples)} images have no caption in {path}; their "
              f"class's template is used (e.g. '{data.synth_caption('glioma')}')")
    return {s.path: table.get(s.path) or data.synth_caption(data.CLASSES[s.label]) for s in samples}


def text_batch(texts, indices, device):
    """The captions of a batch as (ids, mask), cut to the batch's longest caption."""
    ids, mask = texts[0][indices], texts[1][indices]
    length = int(mask.sum(1).max())
    return ids[:, :length].to(device), mask[:, :length].to(device)


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def caption_split(model, inputs, texts, references, args):
    """(generated captions, scores) of view 0 of every image in a split: stats.py's caption metrics
    against one reference caption per image, and the mean teacher-forced loss."""
    model.eval()
    generated, total_loss, device = [], 0.0, model.mean.device
    for start in range(0, len(inputs), args.batch_size):
        indices = list(range(start, min(start + args.batch_size, len(inputs))))
        batch = inputs.batch(indices, [0] * len(indices)).to(device)
        tokens = batch if inputs.cache is not None else model.stem(batch)
        total_loss += model.caption_loss(tokens, *text_batch(texts, indices, device)).item() \
            * len(indices)
        generated += model.decode(model.generate(tokens, args.beams, args.max_length))
    references = [[reference] for reference in references]
    terms = [CLASS_TERMS[name] for name in data.CLASSES]
    scores = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), stats.bleu(generated, references)))
    return generated, dict(scores, rouge_l=stats.rouge_l(generated, references),
                           cider=stats.cider_d(generated, references), n=len(generated),
                           class_accuracy=stats.caption_class_accuracy(
                               generated, inputs.labels.tolist(), terms),
                           loss=total_loss / len(inputs))


# ---- the run: data -> cache -> train -> captions -> run folder ---------------------------------

def write_run_files(out_dir, metrics, history, rows):
    """metrics.json, captions.csv (test: path,reference,generated), report.txt, curves.png."""
    stats.write_json(metrics, os.path.join(out_dir, "metrics.json"))
    data.write_csv(os.path.join(out_dir, "captions.csv"),
                   [("path", "reference", "generated")] + rows)
    keys = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "class_accuracy", "loss")
    lines = [f"{metrics['model']} --train {metrics['train_mode']}, seed {metrics['seed']}, best "
             f"epoch {metrics['best_epoch']} of {metrics['epochs']} ({metrics['selection']})", "",
             f"{'split':<6}" + "".join(f"{key:>15}" for key in keys)]
    lines += [f"{split:<6}" + "".join(f"{metrics[split][key]:>15.4f}" for key in keys)
              for split in ("train", "val", "test") if metrics[split]]
    lines += ["", "test captions (reference | generated):"] + [f"{path}: {ref} | {gen}"
                                                               for path, ref, gen in rows[:12]]
    stats.atomic_write(os.path.join(out_dir, "report.txt"), lambda f: f.write("\n".join(lines)
                                                                              + "\n"), "w")
    if history:
        stats.plot_curves(history, os.path.join(out_dir, "curves.png"), "cider", "train")


def run_one(args, build_model, out_dir, recorded=None):
    """One seed: splits, captions, model, feature cache (--train decoder), clip_tumor.py's training
    loop on the LM loss (the best epoch by CIDEr-D), scores; its run folder and checkpoints."""
    device, checkpoint, splits, split, hashes, model = clip_tumor.start_run(
        args, build_model, out_dir, recorded)
    captions = read_captions(args, splits.train + splits.val + splits.test)
    cached = args.train == "decoder" and not args.no_cache
    cache = data.FeatureCache(args.cache_dir, model) if cached else None
    with stats.run_folder(out_dir, args.overwrite, args.resume):  # after every input check
        clip_tumor.write_config(args, model, splits, split, [], out_dir)
        inputs, _, bad, cache_seconds = clip_tumor.cache_inputs(args, build_model, model, splits,
                                                                hashes, cache, device)
        if bad:
            clip_tumor.write_config(args, model, splits, split, bad, out_dir)
        texts = {name: model.tokenize([captions[s.path] for s in part.samples]) if len(part)
                 else None for name, part in inputs.items()}
        references = {name: [stats.caption_words(captions[s.path]) for s in part.samples]
                      for name, part in inputs.items()}
        score = lambda name: caption_split(model, inputs[name], texts[name], references[name],
                                           args)
        select = "test" if args.select_on == "test" else "val"

        def batch_loss(batch, indices):  # teacher forcing; cached: the encoder's stored tokens
            ids, mask = text_batch(texts["train"], indices, device)
            return model.caption_loss(batch, ids, mask) if cached else model(batch, ids, mask)

        def cider(_):  # what picks the best epoch
            scores = score(select)[1]
            return "cider", scores["cider"], scores["loss"]

        history, best_epoch = [], 0
        if args.epochs > 0:
            history, best_epoch = clip_tumor.train(model, inputs["train"], inputs[select], args,
                                                   out_dir, checkpoint, None, batch_loss, cider)
            clip_tumor.load_checkpoint(f"{out_dir}/best.pt", model)
        metrics = {"model": model.cache_key["model"], "train_mode": args.train, "seed": args.seed,
                   "epochs": args.epochs, "best_epoch": best_epoch, "cached": cached,
                   "selection": f"{args.select_on} CIDEr-D", "beams": args.beams,
                   "seconds_per_epoch": float(np.median([h["seconds"] for h in history]))
                   if history else None, "cache_build_seconds": cache_seconds,
                   "undecodable_skipped": len(bad)}
        generated = {}
        for name in inputs:
            generated[name], metrics[name] = score(name) if len(inputs[name]) else ([], None)
        rows = list(zip([s.path for s in inputs["test"].samples], references["test"],
                        generated["test"], strict=True))
        write_run_files(out_dir, metrics, history, rows)
    test = metrics["test"]
    print(f"test: class accuracy {test['class_accuracy']:.4f}, BLEU-4 {test['bleu_4']:.4f}, "
          f"ROUGE-L {test['rouge_l']:.4f}, CIDEr-D {test['cider']:.4f}; results in {out_dir}/")
    return metrics


# ---- benchmark ---------------------------------------------------------------------------------

def benchmark(args, batch_size=4, rounds=2, caption_tokens=20):
    """ms per image at full size (random BLIP base; 384 px as the checkpoint, 224 as MedBLIP) of
    the vision encoder (the cache's cost per image and view), a decoder-only step on its cached
    tokens and a full step (forward, backward, AdamW), timed by clip_tumor.ms_per_image."""
    result = {}
    for size in (384, 224):
        model = build_model(argparse.Namespace(**dict(vars(args), image_size=size, train="full")))
        pixels = torch.rand(batch_size, 3, size, size)
        ids = torch.randint(10, 1000, (batch_size, caption_tokens))
        mask = torch.ones_like(ids)
        tokens = torch.no_grad()(model.eval().stem)(pixels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # a step skips gradless ones

        def step(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        timed = {"stem_ms": lambda: torch.no_grad()(model.stem)(pixels),
                 "cached_decoder_ms": lambda: step(model.caption_loss(tokens, ids, mask)),
                 "full_ms": lambda: step(model(pixels, ids, mask))}
        model.train()
        ms = clip_tumor.ms_per_image(timed, rounds, batch_size, digits=1)
        result[f"{size}px"] = dict(ms, full_over_cached=round(ms["full_ms"] /
                                                              ms["cached_decoder_ms"], 2))
    return dict(result, batch_size=batch_size, rounds=rounds, caption_tokens=caption_tokens,
                threads=torch.get_num_threads(),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


# ---- command line ------------------------------------------------------------------------------

def build_parser():
    parser = clip_tumor.make_parser(__doc__, EPOCHS)
    a = parser.add_argument
    a("--weights", default=WEIGHTS, help="BlipForConditionalGeneration: hub id or local folder")
    a("--image-size", type=int, default=IMAGE_SIZE, help="input size (MedBLIP 224; checkpoint 384)")
    a("--train", choices=["decoder", "encoder", "full"], default=TRAIN, help="what trains: the "
      "text decoder (vision encoder frozen, its tokens cached), the vision encoder (decoder "
      "frozen), or everything (default: MedBLIP's ROCO study found full fine-tuning best)")
    a("--captions", metavar="CSV", help="path,caption (default DATA/captions.csv; images without "
                                        "one: their class's template)")
    a("--beams", type=int, default=BEAMS, help="beam search width, 1 = greedy (MedBLIP: 3)")
    a("--max-length", type=int, default=MAX_LENGTH, help="most tokens of a generated caption")
    parser.set_defaults(lr=LEARNING_RATE, views=VIEWS)  # --epochs: MedBLIP's 15 (run below)
    return parser


def main(argv=None):
    args = clip_tumor.parse_args(build_parser(), argv, lambda: dict(DEMO, image_size=64,
        weights=write_tiny_weights(os.path.join(clip_tumor.DEMO_DIR, "blip-caption-tiny"))))
    unused = [name for name, ok in (("shots", not args.shots), ("calibrate", not args.calibrate),
              ("attack-eval", not args.attack_eval), ("class-weights", not args.class_weights),
              ("adversarial", args.adversarial == "none"), ("loss", args.loss == "ce"),
              ("beams", args.beams >= 1), ("max-length", args.max_length >= 2),
              ("trainable-blocks", args.trainable_blocks == clip_tumor.TRAINABLE_BLOCKS)) if not ok]
    if unused:
        raise SystemExit(f"error: --{', --'.join(unused)}: not for captioning (or out of range: "
                         f"--beams 1 or more, --max-length 2 or more)")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # its loop has no DDP: ranks would collide
        raise SystemExit("error: caption_tumor.py runs as one process, not under torchrun")
    if args.benchmark:
        print(json.dumps(result := benchmark(args)))
        return result
    return clip_tumor.run(args, build_model, "caption", run_one, EPOCHS)


if __name__ == "__main__":
    main()
