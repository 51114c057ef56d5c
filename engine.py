"""What every training script shares: the feature cache, the training loop, the run folder.

clip_tumor.py, blip_tumor.py and baselines.py each build a model and call `run(args, build_model)`.
A model here is an nn.Module that is split in two:

    model.stem(images)   (B, 3, S, S) pixels in [0, 1] -> frozen features, e.g. (B, 1 + H*W, D)
    model.top(features)  -> (B, n_classes) logits; holds every trainable parameter
    model(images)        -> the same logits the paper's way: the full network, every step
    model.cache_key      -> dict of everything that changes the stem's output

The stem never changes during training, so its output is computed once per image and view and
stored on disk (the feature cache); each step then runs only the top. That is what makes CPU
training feasible: for ViT-B/16 the top is 2 of 12 blocks, and the last block only for CLS.
"""
import argparse
import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import stats

# ---- defaults (the paper's training section) ---------------------------------------------------
EPOCHS = 30            # "30 epochs total"
BATCH_SIZE = 16        # "batch size of 16"
LEARNING_RATE = 3e-4   # "AdamW optimizer with a learning rate of 3e-4"
WEIGHT_DECAY = 0.01    # "AdamW's default weight decay"
RESTART_EPOCHS = 5     # CosineAnnealingWarmRestarts T_0 = 5
FOCAL_GAMMA = 2.0      # focal loss exponent (the paper names focal loss, not its gamma)
VIEWS = 4              # view 0 plain + 3 augmented views per training image
SEEDS = (42, 123, 456, 789, 1011)


def add_arguments(parser, default_out):
    """The options every training script shares (each script adds its model options)."""
    a = parser.add_argument
    a("--data", help="dataset folder: Training/ and Testing/ with class folders, or class folders")
    a("--split", help="split CSV (path,label,split) instead of the folders' split, e.g. from "
                      "`python data.py split --leak-free`")
    a("--seed", type=int, default=42, help="seed for the split, initialisation and batch order")
    a("--seeds", help="comma-separated seeds, e.g. 42,123,456,789,1011: one run per seed "
                      "(sharing one cache), then mean +- std in summary.json")
    a("--val-fraction", type=float, default=0.1, help="share of training images for validation")
    a("--select-on", choices=["val", "test"], default="val",
      help="split that picks the best epoch; 'test' is the paper's protocol (no validation "
           "split, optimistic: every output says so)")
    a("--epochs", type=int, default=EPOCHS, help="training epochs; 0 evaluates zero-shot")
    a("--batch-size", type=int, default=BATCH_SIZE, help="images per step")
    a("--lr", type=float, default=LEARNING_RATE, help="AdamW learning rate")
    a("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay")
    a("--loss", choices=["ce", "focal", "hybrid"], default="ce",
      help="cross-entropy (paper's code), focal, or hybrid = (ce + focal) / 2 (paper's text)")
    a("--class-weights", action="store_true",
      help="weight the loss by inverse class frequency in the training split")
    a("--views", type=int, default=VIEWS, help="views per training image: plain + augmented")
    a("--cache-dir", default="./cache", help="where the frozen stem's outputs are stored")
    a("--no-cache", action="store_true",
      help="run the full network every step (the paper's way; same trainable parameters)")
    a("--skip-bad", action="store_true", help="skip images that cannot be decoded (counted)")
    a("--out", help=f"run folder (default {default_out})")
    a("--overwrite", action="store_true", help="replace an existing run folder")
    a("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint.pt")
    a("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    a("--benchmark", action="store_true",
      help="time stem, naive and cached steps at full size with random weights; print JSON")
    a("--demo", action="store_true", help="offline demo: synthetic data, tiny random model")


# ---- setup -------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) in one place."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """(device, autocast context): CUDA with bfloat16 autocast, or CPU in float32.

    bfloat16 autocast is ~50x slower on CPUs without bf16 units, so CPU runs stay float32.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        return device, torch.autocast("cuda", dtype=torch.bfloat16)
    return device, contextlib.nullcontext()


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a killed run never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def tensor_digest(tensors):
    """SHA-1 over the bytes of the given tensors: the identity of the frozen weights."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


# ---- feature cache -----------------------------------------------------------------------------

class FeatureCache:
    """Stem outputs on disk, one fp16 .npy per (image content, view), under a folder per stem.

    The folder name hashes model.cache_key (model, weights digest, stem depth, image size,
    normalisation, augmentation recipe); the file name is the image's content hash and view.
    So a changed image, weight or recipe is a different entry and a stale one is never read.
    """

    def __init__(self, root, cache_key):
        key_text = json.dumps(cache_key, sort_keys=True)
        self.dir = os.path.join(root, hashlib.sha1(key_text.encode()).hexdigest()[:16])
        os.makedirs(self.dir, exist_ok=True)
        key_file = os.path.join(self.dir, "key.json")
        if not os.path.exists(key_file):
            write_json(cache_key, key_file)  # for humans: what this folder holds

    def path(self, content_hash, view):
        return os.path.join(self.dir, content_hash[:2], f"{content_hash}_v{view}.npy")

    def has(self, content_hash, view):
        return os.path.exists(self.path(content_hash, view))

    def put(self, content_hash, view, features):
        path = self.path(content_hash, view)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, features.numpy().astype(np.float16))
        os.replace(tmp, path)  # atomic: readers see the whole entry or none

    def get(self, content_hashes, views):
        """(B, ...) float32 tensor of the stored features."""
        arrays = [np.load(self.path(h, v)) for h, v in zip(content_hashes, views)]
        return torch.from_numpy(np.stack(arrays)).float()


def build_cache(model, cache, jobs, data_dir, device, batch_size, skip_bad):
    """Run the stem on every (image, view) of `jobs` that is not cached yet.

    jobs: {relative path: (content hash, number of views)}. Returns the paths that could not be
    decoded (only with skip_bad; otherwise the first one raises DataError naming the file).
    """
    todo = [(path, h, v) for path, (h, n_views) in jobs.items() for v in range(n_views)
            if not cache.has(h, v)]
    bad, decoded = [], {}
    model.eval()
    with tqdm(total=len(todo), desc="feature cache", unit="view", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            pixels, keys = [], []
            for path, h, v in batch:
                if path in bad:
                    continue
                if path not in decoded:  # decode once, however many views it needs
                    decoded.clear()
                    try:
                        decoded[path] = data.load_rgb(os.path.join(data_dir, path))
                    except data.DataError:
                        if not skip_bad:
                            raise
                        bad.append(path)
                        continue
                pixels.append(data.image_view(decoded[path], h, v, model.image_size))
                keys.append((h, v))
            if pixels:
                with torch.no_grad():
                    features = model.stem(torch.stack(pixels).to(device)).float().cpu()
                for (h, v), feature in zip(keys, features):
                    cache.put(h, v, feature)
            bar.update(len(batch))
    return bad


def find_undecodable(samples, data_dir):
    """--no-cache path: decode every image once up front, so a bad file fails before training."""
    bad = []
    for sample in tqdm(samples, desc="checking images", unit="image"):
        try:
            data.load_rgb(os.path.join(data_dir, sample.path))
        except data.DataError:
            bad.append(sample.path)
    return bad


class Inputs:
    """Batches for one split: cached stem features (default) or decoded pixels (--no-cache)."""

    def __init__(self, samples, hashes, data_dir, model, cache):
        self.samples, self.hashes, self.data_dir = samples, hashes, data_dir
        self.model, self.cache = model, cache
        self.labels = torch.tensor([s.label for s in samples])

    def __len__(self):
        return len(self.samples)

    def batch(self, indices, views):
        content = [self.hashes[self.samples[i].path] for i in indices]
        if self.cache is not None:
            return self.cache.get(content, views)
        return torch.stack([
            data.image_view(data.load_rgb(os.path.join(self.data_dir, self.samples[i].path)),
                            h, v, self.model.image_size)
            for i, h, v in zip(indices, content, views)])

    def logits(self, inputs):
        return self.model.top(inputs) if self.cache is not None else self.model(inputs)


# ---- loss --------------------------------------------------------------------------------------

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


# ---- training ----------------------------------------------------------------------------------

def trainable_state(model):
    """Trainable parameters plus the buffers of their modules (BatchNorm running statistics)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    owners = {n.rpartition(".")[0] for n in names}
    names |= {n for n, _ in model.named_buffers() if n.rpartition(".")[0] in owners}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable_state(model, state):
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint has weights this model lacks: {unexpected[:5]}")


@torch.no_grad()
def predict(inputs, device, ctx, batch_size):
    """(probabilities (N, C), mean loss) on view 0 of every sample."""
    inputs.model.eval()
    probs, losses = [], []
    for start in range(0, len(inputs), batch_size):
        indices = list(range(start, min(start + batch_size, len(inputs))))
        with ctx:
            logits = inputs.logits(inputs.batch(indices, [0] * len(indices)).to(device)).float()
        labels = inputs.labels[indices].to(device)
        losses.append(F.cross_entropy(logits, labels, reduction="sum").item())
        probs.append(logits.softmax(-1).cpu())
    return torch.cat(probs).numpy(), sum(losses) / max(len(inputs), 1)


def train(model, train_inputs, select_inputs, args, out_dir, device, ctx, checkpoint=None):
    """The training loop, written out: AdamW, warm restarts, best epoch by selection accuracy."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=RESTART_EPOCHS)
    class_weight = (balanced_class_weights(train_inputs.labels.numpy(), model.n_classes).to(device)
                    if args.class_weights else None)
    loss_fn = make_loss(args.loss, class_weight)
    start_epoch, best_accuracy, best_loss, best_epoch, history = 0, -1.0, math.inf, -1, []
    if checkpoint is not None:  # --resume: everything the next epoch depends on
        load_trainable_state(model, checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        start_epoch = checkpoint["epoch"] + 1
        best_accuracy, best_loss = checkpoint["best_accuracy"], checkpoint["best_loss"]
        best_epoch = checkpoint["best_epoch"]
        history = checkpoint["history"]

    n = len(train_inputs)
    steps = max(n // args.batch_size, 1)  # drop the ragged last batch (BatchNorm needs >1)
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        # batch order and views come from (seed, epoch) alone, so a resumed run replays them
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        views = torch.randint(0, args.views, (n,), generator=g).tolist()
        model.train()
        seen, correct, total_loss = 0, 0, 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step in bar:
            indices = order[step * args.batch_size:(step + 1) * args.batch_size]
            batch = train_inputs.batch(indices, [views[i] for i in indices]).to(device)
            labels = train_inputs.labels[indices].to(device)
            with ctx:
                logits = train_inputs.logits(batch)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step(epoch + (step + 1) / steps)  # cosine within each 5-epoch cycle
            seen += len(indices)
            correct += (logits.argmax(-1) == labels).sum().item()  # CPU-GPU sync point
            total_loss += loss.item() * len(indices)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        probs, select_loss = predict(select_inputs, device, ctx, args.batch_size)
        select_accuracy = stats.accuracy(select_inputs.labels.numpy(), probs.argmax(1))
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen,
                        "train_accuracy": correct / seen, "select_loss": select_loss,
                        "select_accuracy": select_accuracy, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.time() - started})
        # best epoch: highest selection accuracy; a tie (common on small sets) goes to lower loss
        if (select_accuracy, -select_loss) > (best_accuracy, -best_loss):
            best_accuracy, best_loss, best_epoch = select_accuracy, select_loss, epoch + 1
            atomic_save({"model": trainable_state(model), "epoch": epoch + 1}, f"{out_dir}/best.pt")
        atomic_save({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "best_accuracy": best_accuracy, "best_loss": best_loss,
                     "best_epoch": best_epoch,
                     "history": history, "torch_rng": torch.get_rng_state(),
                     "config": vars(args)}, f"{out_dir}/checkpoint.pt")
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total_loss / seen:.4f} "
              f"acc {correct / seen:.4f} | {args.select_on} loss {select_loss:.4f} "
              f"acc {select_accuracy:.4f} | {history[-1]['seconds']:.1f}s")
    return history, best_epoch


# ---- outputs -----------------------------------------------------------------------------------

def write_predictions(path, samples, probs, class_names):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "pred"] + [f"p_{c}" for c in class_names])
        for sample, p in zip(samples, probs):
            writer.writerow([sample.path, class_names[sample.label], class_names[int(p.argmax())]]
                            + [f"{x:.6f}" for x in p])


def plot_curves(history, path, select_on):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("train", "train (augmented views)"), ("select", f"{select_on} (view 0)")):
        ax_loss.plot(epochs, [h[f"{key}_loss"] for h in history], marker="o", label=name)
        ax_acc.plot(epochs, [h[f"{key}_accuracy"] for h in history], marker="o", label=name)
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch"), ax.set_ylabel(label), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def leak_free_metrics(args, parts, test_probs, class_names, undecodable):
    """Metrics on the official test images that have no copy (exact, flipped, rotated,
    intensity-changed or re-encoded) in the training folder (data.py's leak audit)."""
    leaky = data.test_paths_with_train_copy(
        args.data, [s.path for s in parts["train"] + parts["val"]],
        [s.path for s in parts["test"]], cache_dir=args.cache_dir, exclude=undecodable)
    keep = np.array([s.path not in leaky for s in parts["test"]])
    y_true = np.array([s.label for s in parts["test"]])[keep]
    if not keep.any():
        print("every test image has a copy in training: no leak-free test metrics")
        return None
    section = stats.metrics_dict(y_true, test_probs[keep].argmax(1), test_probs[keep],
                                 class_names)
    section["n_test_with_train_copy"] = len(leaky)
    print(f"{len(leaky)} of {len(keep)} test images have a copy in training; on the other "
          f"{keep.sum()}: accuracy {section['accuracy']:.4f}, macro-F1 {section['macro_f1']:.4f}")
    return section


def prepare_out_dir(args, default_out):
    out = args.resume or args.out or default_out
    if not args.resume and os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise data.DataError(f"{out}: run folder exists; pass --resume {out} to continue it, "
                                 f"--overwrite to replace it, or --out for a new folder")
        print(f"replacing run folder {out} (--overwrite)")
        for name in os.listdir(out):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    return out


def check_arguments(args):
    """Numbers out of range are an error naming the option, the value and what is allowed."""
    problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in (
        ("views", args.views, args.views >= 1, "at least 1 (view 0 is the plain image)"),
        ("batch-size", args.batch_size, args.batch_size >= 2, "at least 2 (BatchNorm heads)"),
        ("epochs", args.epochs, args.epochs >= 0, "0 (zero-shot) or more"),
        ("lr", args.lr, args.lr > 0, "positive"),
        ("val-fraction", args.val_fraction, 0 < args.val_fraction < 1, "between 0 and 1"))
        if not ok]
    if args.seeds and not all(s.strip().lstrip("-").isdigit() for s in args.seeds.split(",")):
        problems.append(f"--seeds {args.seeds}: comma-separated integers, e.g. 42,123,456")
    if args.split and not os.path.isfile(args.split):
        problems.append(f"--split {args.split}: no such file (make one with `python data.py "
                        f"split --data DIR --out SPLIT.csv --leak-free`)")
    if problems:
        raise data.DataError("; ".join(problems))


def run(args, build_model, default_out):
    """One training run (or one per --seeds seed) from parsed arguments; returns metrics."""
    if not args.resume:
        check_arguments(args)
    if args.seeds:  # one run per seed in OUT/seed<N>/, then mean +- std in OUT/summary.json
        base = args.out or default_out.rsplit("-seed", 1)[0] + "-seeds"
        run_dirs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            one = copy.copy(args)
            one.seed, one.seeds, one.out = seed, None, os.path.join(base, f"seed{seed}")
            run_one(one, build_model, one.out)
            run_dirs.append(one.out)
        summary = stats.summarize_runs(run_dirs)
        write_json(summary, os.path.join(base, "summary.json"))
        print(stats.format_summary(summary))
        print(f"mean +- std over {len(run_dirs)} seeds written to {base}/summary.json")
        return summary
    return run_one(args, build_model, default_out)


def run_one(args, build_model, default_out):
    if args.resume:
        checkpoint_path = os.path.join(args.resume, "checkpoint.pt")
        if not os.path.isfile(checkpoint_path):
            raise data.DataError(f"{checkpoint_path}: not found; --resume takes a run folder "
                                 f"that has finished at least one epoch")
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        resume_dir = args.resume
        args = argparse.Namespace(**checkpoint["config"])  # the run's own options, not today's
        args.resume = resume_dir
        print(f"resuming {resume_dir} after epoch {checkpoint['epoch'] + 1}")
    else:
        checkpoint = None
    if not args.data:
        raise data.DataError("no --data given: pass the dataset folder (or --demo to try it)")
    set_seed(args.seed)
    device, ctx = pick_device(args.device)
    out_dir = prepare_out_dir(args, default_out)
    val_fraction = 0.0 if args.select_on == "test" else args.val_fraction
    splits = data.load_splits(args.data, args.seed, val_fraction, args.split)
    if splits.non_images:
        print(f"note: {len(splits.non_images)} non-image file(s) ignored, e.g. "
              f"{splits.non_images[:3]}")
    model = build_model(args).to(device)
    everything = splits.train + splits.val + splits.test
    hashes = {s.path: data.file_hash(os.path.join(args.data, s.path))
              for s in tqdm(everything, desc="hashing images", unit="image", leave=False)}

    started = time.time()
    if args.no_cache:
        cache, bad = None, find_undecodable(everything, args.data)
        if bad and not args.skip_bad:
            raise data.DataError(f"{os.path.join(args.data, bad[0])}: cannot decode image; "
                                 f"remove it or pass --skip-bad ({len(bad)} such file(s))")
    else:
        cache = FeatureCache(args.cache_dir, model.cache_key)
        jobs = {s.path: (hashes[s.path], 1) for s in splits.val + splits.test}
        jobs.update({s.path: (hashes[s.path], args.views) for s in splits.train})
        bad = build_cache(model, cache, jobs, args.data, device, args.batch_size, args.skip_bad)
    cache_seconds = time.time() - started
    if bad:
        print(f"skipped {len(bad)} undecodable image(s) (--skip-bad): {bad[:5]}")
    parts = {name: [s for s in getattr(splits, name) if s.path not in bad]
             for name in ("train", "val", "test")}
    inputs = {name: Inputs(samples, hashes, args.data, model, cache)
              for name, samples in parts.items()}
    select_name = "test" if args.select_on == "test" else "val"
    config = {"args": vars(args), "model_key": model.cache_key, "split_source": splits.source,
              "counts": {name: np.bincount([s.label for s in samples], minlength=model.n_classes)
                         .tolist() for name, samples in parts.items()},
              "classes": list(model.class_names), "non_images_ignored": splits.non_images,
              "undecodable_skipped": bad}
    write_json(config, os.path.join(out_dir, "config.json"))

    history, best_epoch = [], 0
    if args.epochs > 0:
        history, best_epoch = train(model, inputs["train"], inputs[select_name], args, out_dir,
                                    device, ctx, checkpoint)
        load_trainable_state(model, torch.load(f"{out_dir}/best.pt", weights_only=True)["model"])
    metrics = {"model": model.cache_key.get("model"), "seed": args.seed,
               "selection": ("test set (paper's protocol: the reported test accuracy is "
                             "optimistic, the test set chose the epoch)")
                            if args.select_on == "test" else "validation split",
               "split": splits.source, "best_epoch": best_epoch, "epochs": args.epochs,
               "seconds_per_epoch": float(np.median([h["seconds"] for h in history]))
               if history else None,
               "cache_build_seconds": cache_seconds, "cached": cache is not None,
               "undecodable_skipped": len(bad)}
    for name in ("train", "val", "test"):
        if len(inputs[name]) == 0:
            metrics[name] = None
            continue
        probs, loss = predict(inputs[name], device, ctx, args.batch_size)
        y_true = inputs[name].labels.numpy()
        metrics[name] = stats.metrics_dict(y_true, probs.argmax(1), probs, model.class_names)
        metrics[name]["loss"] = loss
        if name == "test":
            test_probs = probs
    if splits.source == "official":  # the official test set holds copies of training images
        metrics["test_leak_free"] = leak_free_metrics(args, parts, test_probs, model.class_names,
                                                      bad)
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    write_predictions(os.path.join(out_dir, "predictions.csv"), parts["test"], test_probs,
                      model.class_names)
    y_test = inputs["test"].labels.numpy()
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(f"{model.cache_key.get('model')} seed {args.seed}, best epoch {best_epoch} "
                f"chosen on the {metrics['selection']}\n")
        if bad:
            f.write(f"{len(bad)} undecodable image(s) skipped (--skip-bad): {', '.join(bad)}\n")
        f.write("\n")
        f.write(stats.classification_report(y_test, test_probs.argmax(1), model.class_names))
    stats.plot_confusion_matrix(np.array(metrics["test"]["confusion_matrix"]), model.class_names,
                                os.path.join(out_dir, "confusion_matrix.png"),
                                f"test accuracy {metrics['test']['accuracy']:.4f}")
    stats.plot_run_figures(y_test, test_probs, model.class_names, out_dir)  # ROC, PR, reliability
    if history:
        plot_curves(history, os.path.join(out_dir, "curves.png"), select_name)
    print(f"test accuracy {metrics['test']['accuracy']:.4f}, macro-F1 "
          f"{metrics['test']['macro_f1']:.4f} (epoch {best_epoch}, selected on the "
          f"{metrics['selection']}); results in {out_dir}/")
    return metrics


def main(argv, parse_args, build_model, demo_arguments, run_name):
    """The command line every training script shares: --demo, --benchmark, or a run.

    demo_arguments(workdir, args) -> the demo's argv; run_name(args) -> e.g. "clip-ViT-B-16".
    A script's build_model builds random weights when args.benchmark is set (no download).
    """
    args = parse_args(argv)
    if args.demo:
        workdir = os.path.join(tempfile.gettempdir(), "tumor-vlm-demo")
        os.makedirs(workdir, exist_ok=True)
        args = parse_args(demo_arguments(workdir, args))
        torch.set_num_threads(1)  # a tiny model gains nothing from 2 threads; on a busy CPU they stall
    if args.benchmark:
        args.epochs = 1
        print(json.dumps(benchmark(build_model(args))))
        return None
    try:
        return run(args, build_model, f"runs/{run_name(args)}-seed{args.seed}")
    except data.DataError as error:
        sys.exit(f"error: {error}")


# ---- benchmark ---------------------------------------------------------------------------------

def interleaved_medians(timed, repeats):
    """Median seconds of each function, timed in rounds (a, b, c, a, b, c, ...) so that load
    from other processes falls on all of them alike and their ratios stay meaningful."""
    for fn in timed.values():
        fn()  # warm-up: allocator, kernel selection
    times = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t)) for name, t in times.items()}


def benchmark(model, batch_size=BATCH_SIZE, repeats=5):
    """Milliseconds per image for the stem, a naive step, and cached steps; GEMM rate; peak RSS."""
    images = torch.rand(batch_size, 3, model.image_size, model.image_size)
    labels = torch.arange(batch_size) % model.n_classes
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.eval()
    with torch.no_grad():
        features = model.stem(images)

    def step(forward):
        def run_step():
            loss = F.cross_entropy(forward(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run_step

    def stem():
        with torch.no_grad():
            model.stem(images)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    cache = FeatureCache(tempfile.mkdtemp(), {"benchmark": True})  # fp16 entries, page cache
    keys = [f"{i:040x}" for i in range(batch_size)]
    for key, feature in zip(keys, features):
        cache.put(key, 0, feature)
    model.train()
    seconds = interleaved_medians({
        "cache_read_ms": lambda: cache.get(keys, [0] * batch_size),
        "stem_ms": stem,
        "naive_ms": step(lambda: model(images)),
        "cached_ms": step(lambda: model.top(features, cls_only=False)),
        "cached_cls_ms": step(lambda: model.top(features)),
        "gemm": lambda: a @ b}, repeats)
    result = {name: 1000 * s / batch_size for name, s in seconds.items() if name != "gemm"}
    result["gemm_gflops"] = 2 * 2048 ** 3 / seconds["gemm"] / 1e9
    shutil.rmtree(os.path.dirname(cache.dir))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["batch_size"], result["threads"] = batch_size, torch.get_num_threads()
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
