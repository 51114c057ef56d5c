"""Use a trained run: classify (or caption) new images, draw and score explanation maps.

    python predict.py RUN NEW_SCANS        # RUN/predictions_NEW_SCANS.csv: path[,label],pred,p_<c>
    python predict.py RUN --explain --n 8  # RUN/explain/: overlays, explain.json (pointing game)

Any training script's run (a captioner's: captions, and cross-attention at the class word). Its
script rebuilds the model from RUN/config.json, loads best.pt and takes the run's own path (stem
output rounded to fp16, as cached): on its test images this gives predictions.csv exactly (tested).

Maps, checked: Grad-CAM (= pytorch-grad-cam, 1e-4); attention rollout (attentions = transformers',
1e-5), a ViT's default: it hits the demo lesions (CLIP 0.956 vs Grad-CAM 0.289, chance 0.188).
"""
import argparse
import csv
import importlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import clip_tumor
import data
import stats

SCRIPTS = dict(clip="clip_tumor", blip="blip_tumor", cnn="baselines", caption="caption_tumor")
# Pointing game tolerance: 15 pixels at 224 (Zhang et al. 2018), scaled with the input size (an
# upsampled patch map can peak a patch off the lesion); `chance` uses the same grown box.
POINTING_TOLERANCE = 15 / 224
BRAIN_THRESHOLD = 0.1          # grey in [0, 1] above which a pixel is brain (MRI background ~0)


# ---- the run: its model, rebuilt from its own options ------------------------------------------

def load_run(run_dir, device="auto"):
    """(model with best.pt's weights, in eval mode; options, the script's defaults filling keys an
    older run lacks; the script's module). A zero-shot run (--epochs 0) has no best.pt."""
    config_path, best_path = (os.path.join(run_dir, name) for name in ("config.json", "best.pt"))
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: {config_path}: no such file; pass a run folder made by "
                         f"clip_tumor.py, blip_tumor.py, baselines.py or caption_tumor.py")
    config = stats.run_config(run_dir)
    try:
        script = importlib.import_module(SCRIPTS[config["args"]["script"]])
        defaults = vars(script.build_parser().parse_args([]))
        options = argparse.Namespace(**{**defaults, **config["args"], "benchmark": False,
                                        "device": device, "out": run_dir})
    except (KeyError, TypeError) as error:
        raise SystemExit(f"error: {config_path}: cannot read the run's options ({error!r}); pass "
                         f"a run folder made by a training script")
    if options.epochs and not os.path.isfile(best_path):
        raise SystemExit(f"error: {best_path}: not found; the run stopped before its first "
                         f"epoch ended: continue it with --resume {run_dir}")
    model = script.build_model(options)
    rebuilt = json.loads(json.dumps(model.cache_key))  # tuples -> lists, as in config.json
    changed = [key for key in {**rebuilt, **config["model_key"]}
               if rebuilt.get(key) != config["model_key"].get(key)]
    if changed or list(model.class_names) != config["classes"]:
        raise SystemExit(f"error: {config_path}: classes {config['classes']}, model "
                         f"{config['model_key']['model']}; rebuilt from its options: classes "
                         f"{list(model.class_names)}, differing in {changed}; use the weights "
                         f"and class list the run was trained with")
    if options.epochs:  # checked: its SHA-1, exactly the trainable weights, finite
        clip_tumor.load_checkpoint(best_path, model)
    return model.to(clip_tumor.pick_device(options)).eval(), options, script


def images_under(folder):
    """Image files under folder at any depth, sorted (data.files_under: hidden ones skipped)."""
    paths = list(filter(data.is_image, data.files_under(folder)))
    if not paths:
        problem = "no image files in it" if os.path.isdir(folder) else "no such folder"
        raise SystemExit(f"error: {folder}: {problem}; pass a folder of images "
                         f"({', '.join(sorted(data.IMAGE_EXTENSIONS))})")
    return paths


def folder_label(path):
    """The class named by the image's parent folder (glioma/, no_tumor/, ...), or None."""
    return data.normalise_class_name(os.path.basename(os.path.dirname(path)))


def decode_images(paths, root=""):
    """({path: RGB image} of the paths under root that decode, [the others, each noted])."""
    images, undecodable = {}, []
    for path in paths:
        try:
            images[path] = data.load_rgb(os.path.join(root, path))
        except data.DecodeError:
            undecodable.append(path)
            print(f"note: {os.path.join(root, path)}: cannot decode image; skipped (listed)")
    return images, undecodable


@torch.no_grad()
def run_probabilities(model, options, pixels):
    """(B, C) probabilities of pixels (B, 3, S, S) along the run's path (cached: stem in fp16)."""
    pixels = pixels.to(model.mean.device)
    logits = model(pixels) if options.no_cache else model.top(model.stem(pixels).half().float())
    if not torch.isfinite(logits).all():  # never served: NaN probabilities
        raise SystemExit(f"error: {options.out}: its model gives outputs that are not finite "
                         f"(diverged); train it again with a lower --lr")
    return logits.float().softmax(-1).cpu()


# ---- new images --------------------------------------------------------------------------------

def predict_folder(model, options, script, folder, out):
    """CSV path[,label],pred,p_<class>... (a captioner: path[,label],caption) of folder's images."""
    rows, bad, captioner = [], [], options.script == "caption"  # rows: path, label or "", ...
    paths = images_under(folder)
    for start in tqdm(range(0, len(paths), options.batch_size), desc="predict", leave=False,
                      disable=not data.PROGRESS):
        images, undecodable = decode_images(paths[start:start + options.batch_size])
        bad += undecodable
        pixels = [data.image_view(image, None, 0, model.image_size) for image in images.values()]
        if captioner and pixels:  # the caption, as the run's own test captions were written
            rows += [[path, folder_label(path) or "", caption] for path, caption in
                     zip(images, script.describe(model, torch.stack(pixels), options))]
        for path, p in zip(images, run_probabilities(model, options, torch.stack(pixels))
                           if pixels and not captioner else []):
            rows.append([path, folder_label(path) or "", model.class_names[p.argmax()],
                         *(f"{x:.6f}" for x in p.tolist())])
    rows += [[path, "", "undecodable"] + [""] * (not captioner and model.n_classes) for path in bad]
    labelled = [row for row in rows if row[1]]  # a label column only when there are class folders
    header = ["path", "label"] + (["caption"] if captioner else
                                  ["pred"] + [f"p_{name}" for name in model.class_names])
    table = [[os.path.relpath(row[0], folder).replace(os.sep, "/"), *row[1:]] for row in rows]
    data.write_csv(out, [row[:1] + row[1 if labelled else 2:] for row in [header] + table])
    if labelled:  # a caption is right when it names its image's class and no other
        accuracy = stats.caption_class_accuracy(
            [row[2] for row in labelled], [model.class_names.index(row[1]) for row in labelled],
            [script.CLASS_TERMS[c] for c in model.class_names]) if captioner else \
            np.mean([row[1] == row[2] for row in labelled])
        print(f"accuracy {accuracy:.4f} on the {len(labelled)} images in class folders")
    print(f"wrote {out}: {len(rows)} images")
    return out


# ---- explanation maps: Grad-CAM and attention rollout ------------------------------------------

def run_keeping(model, images, layers):
    """(model(images), [for each (module, where) of layers: its output, or its first input])."""
    captured = []

    def keeper(where):  # hidden_states: maybe a keyword in transformers' BLIP
        return lambda module, args, kwargs, output: captured.append(
            output if where == "output" else args[0] if args else kwargs["hidden_states"])

    handles = [module.register_forward_hook(keeper(where), with_kwargs=True)
               for module, where in layers]
    try:
        return model(images), captured
    finally:
        for handle in handles:
            handle.remove()


def patch_grid(tokens):
    """ViT tokens (B, 1 + h*w, D) -> (B, D, h, w), the CLS token dropped."""
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    return tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, side, side)


def grad_cam(model, images, classes):
    """(B, h, w) Grad-CAM (Selvaraju et al. 2017) of classes (B,) on images (B, 3, S, S): with A
    (B, K, h, w) the activations model.explain_layer() names, w_k = mean over positions of d logit /
    d A_k, map = ReLU(sum_k w_k A_k). images require grad: a frozen stem's A is in the graph."""
    logits, (activations,) = run_keeping(model, images.detach().requires_grad_(True),
                                         [model.explain_layer()])
    gradients, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), activations)
    if activations.dim() == 3:  # ViT tokens
        activations, gradients = patch_grid(activations), patch_grid(gradients)
    weights = gradients.mean((2, 3), keepdim=True)                       # (B, K, 1, 1)
    return torch.relu((weights * activations).sum(1)).detach().cpu().numpy()


def attention_probabilities(block, tokens):
    """(B, heads, T, T) attention of an open_clip, timm or BLIP block on its input (B, T, D)."""
    if hasattr(block, "ln_1"):  # open_clip: nn.MultiheadAttention returns them
        normed = block.ln_1(tokens)
        return block.attn(normed, normed, normed, need_weights=True,
                          average_attn_weights=False)[1]
    attn = block.self_attn if hasattr(block, "self_attn") else block.attn  # BLIP, timm: fused qkv
    normed = block.layer_norm1(tokens) if hasattr(block, "layer_norm1") else block.norm1(tokens)
    query, keys, _ = clip_tumor.fused_qkv(attn.qkv, attn.num_heads, normed)  # (B, nh, T, hd)
    if hasattr(attn, "q_norm"):  # timm's optional query and key norms
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    return (query @ keys.transpose(-2, -1) * attn.scale).softmax(-1)


@torch.no_grad()
def attention_rollout(model, images):
    """(B, h, w) attention rollout (Abnar & Zuidema 2020): each block's head-averaged attention A
    (B, T, T) as (A + I) / 2, rows renormalised, multiplied from the first; CLS's row on patches."""
    blocks = model.attention_blocks()
    if not blocks:
        raise SystemExit("error: --method rollout: this model has no attention blocks (a CNN); "
                         "use --method gradcam")
    _, inputs = run_keeping(model, images, [(block, "input") for block in blocks])
    rollout = identity = torch.eye(inputs[0].shape[1], device=inputs[0].device)  # (T, T)
    for block, tokens in zip(blocks, inputs):
        attention = attention_probabilities(block, tokens).mean(1) + identity  # (B, T, T)
        rollout = attention / attention.sum(-1, keepdim=True) @ rollout
    return patch_grid(rollout[:, :1].transpose(1, 2))[:, 0].cpu().numpy()  # CLS row (B, h, w)


def pointing_game(maps, boxes, brain_masks, tolerance):
    """(hit rate, chance) of maps (H, W), boxes (x0, y0, x1, y1; x1, y1 exclusive), brain masks:
    a hit: the map's first maximum in the box grown by tolerance; chance: a random brain pixel's."""
    hits, chances = [], []
    for heat, (x0, y0, x1, y1), brain in zip(maps, boxes, brain_masks, strict=True):
        rows, cols = np.indices(heat.shape)                              # (H, W) each
        in_box = ((cols >= x0 - tolerance) & (cols < x1 + tolerance)
                  & (rows >= y0 - tolerance) & (rows < y1 + tolerance))
        hits.append(in_box[np.unravel_index(np.argmax(heat), heat.shape)])
        chances.append(np.mean(in_box[np.asarray(brain, dtype=bool)]))
    return float(np.mean(hits)), float(np.mean(chances))


def plot_explanation(image, heat, title, path, box=None):
    """PNG: title over image (3, S, S) in [0, 1] and the image under heat (S, S) (jet, 45 %) with
    the lesion box, panels >= 256 px. PIL: a matplotlib figure takes 30x longer (0.15 s)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont
    picture = np.transpose(np.asarray(image, dtype=np.float64), (1, 2, 0))  # (S, S, 3)
    colours = colormaps["jet"]((heat - heat.min()) / max(np.ptp(heat), 1e-12))[..., :3]
    scale, margin, top = max(1, -(-256 // len(picture))), 8, 40
    side = len(picture) * scale
    canvas = Image.new("RGB", (2 * side + 3 * margin, side + top + margin), "white")
    for k, pixels in enumerate((picture, 0.55 * picture + 0.45 * colours)):
        panel = Image.fromarray(np.uint8(np.round(255 * pixels.clip(0, 1))))
        canvas.paste(panel.resize((side, side), Image.NEAREST), (margin + k * (side + margin), top))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((margin, 4), title, fill="black", font=ImageFont.load_default(13))
    if box is not None:
        x0, y0, x1, y1 = (scale * v for v in box)
        left = 2 * margin + side
        draw.rectangle([left + x0, top + y0, left + x1 - 1, top + y1 - 1], outline="white")
    canvas.save(path)


def read_lesion_boxes(csv_path):
    """{path: (x0, y0, x1, y1)} of a CSV path,x0,y0,x1,y1: image file pixels, x1, y1 exclusive."""
    boxes, line = {}, 1
    try:
        with open(csv_path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                box = tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))
                if not 0 <= box[0] < box[2] or not 0 <= box[1] < box[3] or row["path"] in boxes:
                    raise ValueError(f"box {box} of {row['path']}")
                boxes[row["path"]] = box
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"error: {csv_path}:{line}: {type(error).__name__}: {error}; need a CSV "
                         f"path,x0,y0,x1,y1 of whole pixels 0 <= x0 < x1, 0 <= y0 < y1, a row each")
    return boxes


def explain_paths(model, run_dir, n):
    """n of the run's test images to explain, from queues in turn: per class the most confident
    right and the most confident wrong (a captioning run: per class, in captions.csv order)."""
    if os.path.isfile(os.path.join(run_dir, "captions.csv")):
        with open(os.path.join(run_dir, "captions.csv"), newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
        queues = [[path for path in paths if folder_label(path) == c] for c in model.class_names]
    else:
        paths, y_true, y_pred, probs, _ = stats.read_predictions(
            os.path.join(run_dir, "predictions.csv"))
        confident = np.argsort(-probs.max(1), kind="stable")  # most confident first
        queues = [[paths[i] for i in confident if y_true[i] == c and (y_pred[i] == c) == right]
                  for c in range(model.n_classes) for right in (True, False)]
    return [queue[k] for k in range(len(paths)) for queue in queues if k < len(queue)][:n]


def remove_earlier_maps(out_dir):
    """--overwrite: the overlays an earlier call listed in explain.json go, nothing else."""
    earlier = os.path.join(out_dir, "explain.json")
    if os.path.isfile(earlier):
        try:
            with open(earlier) as f:
                overlays = [os.path.join(out_dir, record["overlay"])
                            for record in json.load(f)["images"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"error: {earlier}: cannot read which maps it wrote ({error}); pass "
                             f"another --out")
        for overlay in filter(os.path.isfile, overlays):
            os.remove(overlay)


def explain(model, options, script, args, out_dir):
    """Heat maps of the predicted class for --n test images or those under --images: overlays and
    explain.json in out_dir, the pointing game where lesions are known (lesions.csv, --lesions)."""
    root, size = args.images or options.data, model.image_size
    if not args.images and not os.path.isdir(root or ""):
        raise SystemExit(f"error: {root}: the run's data folder is gone; pass --images DIR (and "
                         f"--lesions CSV to score the maps)")
    paths = [os.path.relpath(path, root) for path in images_under(root)] if args.images else \
        explain_paths(model, args.run, args.n)
    images, undecodable = decode_images(paths, root)
    if not images:
        raise SystemExit(f"error: {root}: no image to explain could be decoded")
    lesions = args.lesions or os.path.join(root, "lesions.csv")
    boxes = read_lesion_boxes(lesions) if args.lesions or os.path.isfile(lesions) else {}
    for line, (path, box) in enumerate(boxes.items(), start=2):  # a row each, in file order
        if path in images and (box[2] > images[path].width or box[3] > images[path].height):
            raise SystemExit(f"error: {lesions}:{line}: box {box} lies outside {path} "
                             f"({images[path].width} x {images[path].height}); fix the row")
    if boxes:  # rows for other images are expected (--n of the test images), none is suspect
        print(f"lesions: {sum(path in boxes for path in images)} of the {len(images)} images have "
              f"a box in {lesions} (paths relative to {root})")
    pixels = torch.stack([data.image_view(image, None, 0, size) for image in images.values()])
    batches = pixels.split(options.batch_size)  # one at a time: Grad-CAM keeps a batch's graph
    if options.script == "caption":  # the decoder's cross-attention where it names the class
        method, explained = "cross-attention", "the step that wrote the class word"
        maps, captions = zip(*(script.cross_attention_maps(model, batch, options)
                               for batch in batches))
        said = [caption for batch_captions in captions for caption in batch_captions]
        named = [stats.named_classes(caption, [script.CLASS_TERMS[c] for c in model.class_names])
                 for caption in said]  # the first class a caption names is its prediction
        preds = [model.class_names[min(classes)] if classes else "none" for classes in named]
    else:
        method = args.method or ("rollout" if model.attention_blocks() else "gradcam")
        explained, device = "predicted class", model.mean.device
        confidences, classes = run_probabilities(model, options, pixels).max(1)  # (N,) each
        maps = [grad_cam(model, batch.to(device), batch_classes.to(device))
                if method == "gradcam" else attention_rollout(model, batch.to(device))
                for batch, batch_classes in zip(batches, classes.split(options.batch_size))]
        preds = [model.class_names[c] for c in classes]
        said = [f"p = {p:.3f}" for p in confidences.tolist()]
    maps = torch.nn.functional.interpolate(torch.from_numpy(np.concatenate(maps))[:, None].float(),
                                           size=size, mode="bilinear")[:, 0].numpy()
    remove_earlier_maps(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    records, scored = [], []
    for k, (path, image) in enumerate(images.items()):
        box = boxes.get(path)
        if box:  # to the model's input pixels, in whole numbers (no rounding drift); x1, y1 up
            (x0, y0, x1, y1), (width, height) = box, image.size
            box = (x0 * size // width, y0 * size // height, -(-x1 * size // width),
                   -(-y1 * size // height))
            scored.append((maps[k], box, pixels[k].mean(0).numpy() > BRAIN_THRESHOLD))
        y, x = np.unravel_index(np.argmax(maps[k]), maps[k].shape)
        overlay = f"{k:02d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        records.append({"path": path, "label": folder_label(path), "box": box, "argmax_xy": [x, y],
                        "pred": preds[k], "said": said[k], "overlay": overlay})
        title = f"{path}\ntrue {folder_label(path) or 'unknown'}, predicted {preds[k]} ({said[k]})"
        plot_explanation(pixels[k], maps[k], title, os.path.join(out_dir, overlay), box)
    result = {"run": args.run, "method": method, "explained": explained, "image_size": size,
              "images": records, "undecodable": undecodable}
    if scored:  # tolerance in the model's input pixels
        tolerance = POINTING_TOLERANCE * size
        hit, chance = pointing_game(*zip(*scored), tolerance)
        result.update(pointing_game=hit, chance=chance, n_scored=len(scored), lesions=lesions,
                      tolerance_pixels=tolerance, brain_threshold=BRAIN_THRESHOLD)
        print(f"pointing game {hit:.3f} vs chance {chance:.3f} on {len(scored)} lesions")
    stats.write_json(result, os.path.join(out_dir, "explain.json"))
    print(f"wrote {out_dir}/: {len(records)} overlays and explain.json")
    return result


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = parser.add_argument
    a("run", metavar="RUN", help="a run folder made by a training script (any of the four)")
    a("images_dir", metavar="IMAGES_DIR", nargs="?", help="classify every image under it")
    a("--explain", action="store_true", help="heat maps of the run's test images (or --images)")
    a("--n", type=int, default=8, help="--explain: images, the most confident right and wrong")
    a("--images", metavar="DIR", help="--explain the images under DIR instead")
    a("--lesions", metavar="CSV", help="boxes path,x0,y0,x1,y1 (default <images>/lesions.csv)")
    a("--method", choices=["gradcam", "rollout"], help="default: rollout (ViT), Grad-CAM (CNN)")
    a("--out", help="default RUN/predictions_<IMAGES_DIR>.csv, or --explain: RUN/explain/")
    a("--overwrite", action="store_true", help="replace the CSV or an earlier --explain's maps")
    a("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    args = parser.parse_args(argv)
    if bool(args.images_dir) == args.explain:
        raise SystemExit("error: give IMAGES_DIR (classify it) or --explain (heat maps), one of "
                         "the two: python predict.py RUN DIR, or python predict.py RUN --explain")
    if args.n < 1:
        raise SystemExit(f"error: --n {args.n}: 1 or more")
    out = args.out or (os.path.join(args.run, "explain") if args.explain else os.path.join(
        args.run, "predictions_" + os.path.basename(os.path.normpath(args.images_dir)) + ".csv"))
    stats.check_new_output(os.path.join(out, "explain.json") if args.explain else out,
                           args.overwrite)
    model, options, script = load_run(args.run, args.device)
    if args.explain:
        return explain(model, options, script, args, out)
    return predict_folder(model, options, script, args.images_dir, out)


if __name__ == "__main__":
    main()
