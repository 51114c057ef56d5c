"""Metrics, statistics, calibration and the run folder of tumor-vlm: every number it reports.

    python stats.py compare runs/clip-seed0 runs/blip-seed0   # bootstrap CIs, paired diff, McNemar
    python stats.py summary runs/seed* --out summary.json    # mean +- sample std over runs

Checked against scikit-learn or worked examples in tests/test_stats.py. y_true, y_pred: class
indices (N,); probs: (N, C); a confusion matrix has rows = true, columns = predicted class.
"""
import argparse
import contextlib
import csv
import errno
import fnmatch
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
from collections import Counter

import numpy as np
from scipy import optimize, special, stats as scipy_stats

CI_METHOD = "BCa"          # bootstrap interval: 'BCa' (bias-corrected, accelerated) or 'percentile'
N_RESAMPLES = 2000         # bootstrap resamples per interval
CONFIDENCE_LEVEL = 0.95    # two-sided level of every interval
SEED = 0                   # seed of the bootstrap resampling (np.random.default_rng)
ECE_BINS = 15              # equal-width confidence bins of the expected calibration error


# ---- classification metrics from hard predictions ----------------------------------------------

def _safe_divide(numerator, denominator):  # elementwise; 0 where denominator is 0 (zero_division=0)
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def accuracy(y_true, y_pred):
    """Fraction of images whose predicted class equals the true class."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true, y_pred, n_classes):
    """Counts (C, C): [t, p] = images of true class t predicted as p."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if not np.all((0 <= y_true) & (y_true < n_classes) & (0 <= y_pred) & (y_pred < n_classes)):
        raise SystemExit(f"error: a label is outside 0..{n_classes - 1}; pass every class name")
    counts = np.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2)  # index of (t, p)
    return counts.reshape(n_classes, n_classes)


def precision_recall_f1(y_true, y_pred, n_classes):
    """Per-class precision, recall, F1 and support, each (C,); 0/0 gives 0 (zero_division=0)."""
    counts = confusion_matrix(y_true, y_pred, n_classes)
    true_pos, predicted, support = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    f1 = _safe_divide(2 * true_pos, predicted + support)  # 2TP / (2TP + FP + FN)
    return _safe_divide(true_pos, predicted), _safe_divide(true_pos, support), f1, support


def macro_average(per_class, support):
    """Mean (..., C) -> (...) over the classes PRESENT in y_true (sklearn's macro with labels =
    those): an absent class's recall and F1 mean nothing, and 0s would cap macro-F1 at (C-1)/C."""
    present = np.asarray(support) > 0
    with np.errstate(invalid="ignore"):  # no class present: 0/0 -> NaN
        return np.sum(np.where(present, per_class, 0), axis=-1) / present.sum(axis=-1)


def top_k_accuracy(y_true, probs, k):
    """Share of images whose true class is among the k most probable; ties count as hits."""
    true_class_prob = probs[np.arange(len(y_true)), y_true]           # (N,)
    n_classes_above = (probs > true_class_prob[:, None]).sum(axis=1)  # (N,); sklearn: ties by index
    return float(np.mean(n_classes_above < k))


# ---- ranking metrics from probabilities: one-vs-rest ROC AUC and average precision -------------

def _one_vs_rest(y_true, probs, area):  # area(is c, probs[:, c]) per class (NaN: absent), the mean
    per_class = np.full(probs.shape[1], np.nan)
    for c in np.unique(y_true):
        per_class[c] = area(y_true == c, probs[:, c])
    defined = per_class[~np.isnan(per_class)]
    return per_class, float(defined.mean()) if defined.size else np.nan


def roc_auc_ovr(y_true, probs):
    """One-vs-rest ROC AUC per class and macro: the share of (positive, negative) pairs scored in
    the right order, a tie counting half (Mann-Whitney U; equals sklearn's trapezoids)."""
    def pairs_in_order(is_positive, scores):
        n_pos, n_neg = np.sum(is_positive), np.sum(~is_positive)
        if n_neg == 0:  # c is all of y_true: no pair
            return np.nan
        ranks = scipy_stats.rankdata(scores)  # 1..N, tied scores share their average rank
        # a positive's rank counts the images at or below it; less the positives, negatives below
        return (np.sum(ranks[is_positive]) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return _one_vs_rest(y_true, probs, pairs_in_order)


def average_precision(y_true, probs):
    """One-vs-rest average precision per class and macro: sklearn's sum_i (R_i - R_{i-1}) P_i over
    distinct thresholds, i.e. the mean over positives of the precision at their own score."""
    def mean_precision_at_positives(is_positive, scores):
        called = scipy_stats.rankdata(-scores, method="max")  # images scoring >= each image
        found = scipy_stats.rankdata(-scores[is_positive], method="max")  # positives among them
        return np.mean(found / called[is_positive])
    return _one_vs_rest(y_true, probs, mean_precision_at_positives)


# ---- calibration -------------------------------------------------------------------------------

def calibration_bins(y_true, probs, n_bins=ECE_BINS):
    """Per bin (b / n_bins, (b + 1) / n_bins] of top-1 probability: its mean, accuracy, count."""
    probs = np.asarray(probs, dtype=float)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y_true)
    bin_index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore"):  # empty bins: 0/0 -> NaN
        mean_confidence = np.bincount(bin_index, confidence, minlength=n_bins) / count
        return mean_confidence, np.bincount(bin_index, correct, minlength=n_bins) / count, count


def expected_calibration_error(y_true, probs, n_bins=ECE_BINS):
    """ECE = sum over bins of (images in bin / N) |accuracy - mean confidence| (Guo et al. 2017)."""
    mean_confidence, bin_accuracy, count = calibration_bins(y_true, probs, n_bins)
    return float(np.nansum(count / count.sum() * np.abs(bin_accuracy - mean_confidence)))


def fit_temperature_and_offsets(logits, y_true):
    """(T, b) minimising the NLL of softmax(logits / T + b), by L-BFGS on (log T, b) from the model
    as it is (T = 1, b = 0), kept unless the fit ends lower; b has mean 0 (softmax ignores it)."""
    logits, rows = np.asarray(logits, dtype=float), np.arange(len(y_true))

    def nll(params):  # params = (log T, b_1 .. b_C); gradients by finite differences
        log_probs = special.log_softmax(logits / np.exp(params[0]) + params[1:], axis=1)
        return -np.mean(log_probs[rows, y_true])

    start = np.zeros(1 + logits.shape[1])  # min keeps start unless the fit's NLL is lower
    fitted = min(start, optimize.minimize(nll, start, method="L-BFGS-B").x, key=nll)
    return float(np.exp(fitted[0])), fitted[1:] - fitted[1:].mean()


def calibrate(val_logits, val_y, test_logits, test_y, class_names, negative_class="notumor"):
    """Fit on validation, score on test: fit_temperature_and_offsets, then the threshold on
    P(tumour) = 1 - P(negative_class) with the best validation tumour F1 (BiomedCLIP's remedy)."""
    if negative_class not in class_names:
        raise SystemExit(f"error: calibrate: {negative_class!r} is not one of {list(class_names)}; "
                         "pass the no-tumour class as negative_class")
    negative = list(class_names).index(negative_class)

    def tumour_f1(y_true, called_tumour):  # F1 of the yes/no call: class 1 of (tumour?, called?)
        return float(precision_recall_f1(y_true != negative, called_tumour, 2)[2][1])

    val_logits, test_logits = np.asarray(val_logits, float), np.asarray(test_logits, float)
    temperature, offsets = fit_temperature_and_offsets(val_logits, val_y)
    result = {"temperature": temperature, "offsets": dict(zip(class_names, offsets))}
    for split, logits, y_true in (("val", val_logits, val_y), ("test", test_logits, test_y)):
        for when, scaled in (("before", logits), ("after", logits / temperature + offsets)):
            log_probs = special.log_softmax(scaled, axis=1)  # (N, C); NLL: mean -log p(true class)
            result[f"{split}_nll_{when}"] = -np.mean(log_probs[np.arange(len(y_true)), y_true])
            result[f"{split}_ece_{when}"] = expected_calibration_error(y_true, np.exp(log_probs))
    val_tumour = 1 - special.softmax(val_logits / temperature + offsets, axis=1)[:, negative]
    test_probs = special.softmax(test_logits / temperature + offsets, axis=1)  # (N, C)
    # only the validation scores can change the call: try each; max keeps the lowest of ties
    threshold = float(max(np.unique(val_tumour), key=lambda t: tumour_f1(val_y, val_tumour >= t)))
    before = tumour_f1(test_y, test_logits.argmax(axis=1) != negative)
    after = tumour_f1(test_y, 1 - test_probs[:, negative] >= threshold)
    return result | {"threshold": threshold, "test_probs": test_probs,
                     "test_tumour_f1_before": before, "test_tumour_f1_after": after}


# ---- all metrics of one split, and the paper's table -------------------------------------------

def metrics_dict(y_true, y_pred, probs, class_names):
    """Every metric of one split, JSON-ready (NaN -> None); probs=None leaves out ranking ones."""
    n_classes = len(class_names)
    precision, recall, f1, support = precision_recall_f1(y_true, y_pred, n_classes)
    counts = confusion_matrix(y_true, y_pred, n_classes)
    negatives = len(y_true) - support  # images of the other classes, TN + FP, one vs rest
    specificity = _safe_divide(negatives - (counts.sum(axis=0) - np.diag(counts)), negatives)
    per_class = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                 "sensitivity": recall, "specificity": specificity}  # each (C,)
    result = {"n": len(y_true), "accuracy": accuracy(y_true, y_pred),
              "macro_f1": macro_average(f1, support),
              "weighted_f1": _safe_divide(f1 @ support, support.sum()),
              "macro_precision": macro_average(precision, support),
              "macro_recall": macro_average(recall, support), "confusion_matrix": counts}
    if probs is not None:
        per_class["roc_auc"], result["macro_roc_auc"] = roc_auc_ovr(y_true, probs)
        per_class["pr_auc"], result["macro_pr_auc"] = average_precision(y_true, probs)
        if n_classes > 2:
            result["top2_accuracy"] = top_k_accuracy(y_true, probs, k=2)
        result["ece"] = expected_calibration_error(y_true, probs)
    result["per_class"] = {name: {metric: values[c] for metric, values in per_class.items()}
                           for c, name in enumerate(class_names)}
    return _to_json(result)


def classification_report(y_true, y_pred, class_names):
    """Text in the layout of the paper's Tables 3-4; Macro Avg over the classes present (noted)."""
    precision, recall, f1, support = precision_recall_f1(y_true, y_pred, len(class_names))
    scores, n = np.stack([precision, recall, f1]), len(y_true)  # (3, C), images
    width = max(len("Overall Accuracy"), *(len(name) for name in class_names))
    row = f"{{:<{width}}}  {{:>9}}  {{:>6}}  {{:>8}}  {{:>7}}".format
    cells = lambda values: [f"{value:.2f}" for value in values]
    lines = [row("Class", "Precision", "Recall", "F1-score", "Support")]
    lines += [row(name, *cells(scores[:, c]), support[c]) for c, name in enumerate(class_names)]
    lines += [row("Overall Accuracy", "", "", *cells([accuracy(y_true, y_pred)]), n),
              row("Macro Avg", *cells(macro_average(scores, support)), n),
              row("Weighted Avg", *cells(scores @ _safe_divide(support, support.sum())), n)]
    absent = [name for name, count in zip(class_names, support) if count == 0]
    if absent:
        lines.append(f"Macro Avg is over the classes present; no true image of {', '.join(absent)}")
    return "\n".join(lines)


# ---- statistical tests: McNemar and bootstrap confidence intervals -----------------------------

def mcnemar(correct_a, correct_b, continuity_correction=True):
    """McNemar's test; b, c = images right only in A, only in B. Exact p: two-sided binomial test
    of b ~ Bin(b + c, 1/2); chi2 = (|b - c| - 1)^2 / (b + c), 1 dof (-1: continuity correction)."""
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    exact_p, chi2, chi2_p = 1.0, 0.0, 1.0  # never disagreeing: no evidence either way
    if only_a + only_b > 0:
        exact_p = float(scipy_stats.binomtest(only_a, only_a + only_b, p=0.5).pvalue)
        chi2 = (abs(only_a - only_b) - float(continuity_correction)) ** 2 / (only_a + only_b)
        chi2_p = float(scipy_stats.chi2.sf(chi2, df=1))
    return {"both_correct": int(np.sum(correct_a & correct_b)), "only_a_correct": only_a,
            "only_b_correct": only_b, "both_wrong": int(np.sum(~correct_a & ~correct_b)),
            "mcnemar_exact_p": exact_p, "mcnemar_chi2": chi2, "mcnemar_chi2_p": chi2_p}


def bootstrap_ci(samples, statistic, method=CI_METHOD, n_resamples=N_RESAMPLES, seed=SEED,
                 confidence_level=CONFIDENCE_LEVEL):
    """(low, high) interval of statistic(*samples[, axis]), the images of all samples resampled
    jointly by scipy.stats.bootstrap; a point interval when every resample gives one value."""
    options = {"paired": True, "confidence_level": confidence_level}
    result = scipy_stats.bootstrap(samples, statistic, n_resamples=n_resamples,
                                   method="percentile", rng=np.random.default_rng(seed), **options)
    if np.ptp(result.bootstrap_distribution) == 0:  # e.g. all correct: BCa is undefined
        return (float(result.bootstrap_distribution[0]),) * 2
    if method.lower() != "percentile":  # same resamples, only the interval rule changes
        result = scipy_stats.bootstrap(samples, statistic, n_resamples=0, method=method,
                                       bootstrap_result=result, **options)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def accuracy_ci(correct, **bootstrap_options):
    """Interval of the accuracy from per-image correctness (N,); options as bootstrap_ci's."""
    return bootstrap_ci((np.asarray(correct, dtype=float),), np.mean, **bootstrap_options)


def macro_f1_ci(y_true, y_pred, n_classes, **bootstrap_options):
    """Interval of macro-F1 as metrics_dict defines it (over the classes present in a resample)."""
    def macro_f1(true_resample, pred_resample):  # no axis argument: called once per resample
        _, _, f1, support = precision_recall_f1(true_resample, pred_resample, n_classes)
        return macro_average(f1, support)
    return bootstrap_ci((np.asarray(y_true), np.asarray(y_pred)), macro_f1, **bootstrap_options)


def accuracy_difference_ci(correct_a, correct_b, **bootstrap_options):
    """Paired interval of accuracy(A) - accuracy(B): the per-image differences resampled."""
    # sums of exact -1 / 0 / 1 values: equal resamples give bit-equal means, as BCa's bias needs
    differences = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    return bootstrap_ci((differences,), np.mean, **bootstrap_options)


# ---- caption metrics: BLEU, ROUGE-L, CIDEr-D, class accuracy ---------------------------------
# As pycocoevalcap computes them (tests/test_caption.py compares to 1e-6): candidates are the
# generated captions, references a list of captions per image, all normalised by caption_words.
# METEOR (needs Java), BERTScore and CLIPScore (need model weights) are not computed here.

def caption_words(text):
    """Lower case, punctuation dropped, words joined by single spaces (MedBLIP's cleaning)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _ngrams(words, n):  # Counter of the 1- to n-grams (tuples) of a list of words
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def bleu(candidates, references, n=4):
    """[BLEU-1, ..., BLEU-n] of the corpus (Papineni et al. 2002): geometric mean of the n-gram
    precisions 1..k (clipped at the most one reference has) times exp(1 - r / c) if c, the words of
    all candidates, < r, the closest reference lengths summed (ties: shorter, as pycocoevalcap)."""
    correct, guessed, length, reference_length = np.zeros(n), np.zeros(n), 0, 0
    for candidate, refs in zip(candidates, references, strict=True):
        words, ref_words = candidate.split(), [ref.split() for ref in refs]
        most = Counter()
        for ref in ref_words:
            most |= _ngrams(ref, n)  # | keeps the larger count of each n-gram
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        guessed += np.maximum(len(words) - np.arange(n), 0)
        length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
    scores = np.cumprod((correct + 1e-15) / (guessed + 1e-9)) ** (1 / np.arange(1, n + 1))
    ratio = (length + 1e-15) / (reference_length + 1e-9)  # pycocoevalcap's guards against 0
    return (scores * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)).tolist()


def _lcs_length(a, b):  # length of the longest common subsequence of two word lists
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidates, references, beta=1.2):
    """ROUGE-L (Lin 2004) as pycocoevalcap: mean over images of (1 + beta^2) P R / (R + beta^2 P),
    P, R = longest common subsequence / candidate, reference length, each best over references."""
    scores = []
    for candidate, refs in zip(candidates, references, strict=True):
        words = candidate.split()
        lcs = [(_lcs_length(words, ref.split()), len(ref.split())) for ref in refs]
        precision = max(common / max(len(words), 1) for common, _ in lcs)
        recall = max(common / max(ref_length, 1) for common, ref_length in lcs)
        scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
                      if precision and recall else 0.0)
    return float(np.mean(scores))


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider: 10 x the mean over n = 1..n and the
    references of the cosine of TF-IDF n-gram vectors (the candidate's clipped at the reference's)
    times exp(-delta^2 / (2 sigma^2)), delta the length difference in bigrams; mean over images."""
    counted = [(_ngrams(c.split(), n), [_ngrams(r.split(), n) for r in refs])
               for c, refs in zip(candidates, references, strict=True)]
    documents = Counter(gram for _, refs in counted for gram in set().union(*refs))
    log_images = math.log(len(counted))

    def weights(grams):  # ([{n-gram: tf-idf} for each n], [norm for each n], bigrams)
        vectors = [{} for _ in range(n)]
        for gram, count in grams.items():
            vectors[len(gram) - 1][gram] = count * (log_images - math.log(max(1, documents[gram])))
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms, sum(count for gram, count in grams.items() if len(gram) == 2)

    scores = []
    for candidate, refs in counted:
        vectors, norms, length = weights(candidate)
        total = np.zeros(n)
        for ref in refs:
            ref_vectors, ref_norms, ref_length = weights(ref)
            for k in range(n):
                overlap = sum(min(w, ref_vectors[k].get(g, 0.0)) * ref_vectors[k].get(g, 0.0)
                              for g, w in vectors[k].items())
                cosine = overlap / (norms[k] * ref_norms[k]) if norms[k] and ref_norms[k] else 0.0
                total[k] += cosine * math.exp(-(length - ref_length) ** 2 / (2 * sigma ** 2))
        scores.append(10.0 * total.mean() / len(refs))
    return float(np.mean(scores))


def named_classes(caption, class_terms):
    """{c: the caption says a phrase of class_terms[c] as whole words}, e.g. ("no tumor",) for c
    = notumor (padded with spaces: "no tumors" does not name it)."""
    return {c for c, terms in enumerate(class_terms)
            if any(f" {term} " in f" {caption} " for term in terms)}


def caption_class_accuracy(candidates, labels, class_terms):
    """Share of captions naming their image's class and no other (naming none is wrong)."""
    return float(np.mean([named_classes(text, class_terms) == {label}
                          for text, label in zip(candidates, labels, strict=True)]))


# ---- the run folder: metrics.json, predictions.csv, report.txt, figures ------------------------

def _to_json(value):
    """Plain-Python copy of nested dicts, lists and NumPy values; NaN and +-inf become None."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()  # NumPy array or scalar -> nested lists of bool, int, float
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def atomic_write(path, write, mode="wb"):
    """write(file) to path.tmp<pid>, renamed over path: a killed run never leaves half a file."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(temporary, mode, newline=None if "b" in mode else "") as file:
            write(file)
        os.replace(temporary, path)
    except OSError as error:  # e.g. a full disk, a read-only folder
        fix = "free disk space or choose" if error.errno == errno.ENOSPC else "choose"
        raise SystemExit(f"error: {path}: cannot write ({error.strerror}); {fix} another --out "
                         f"/ --cache-dir") from None
    finally:
        if os.path.exists(temporary):  # any failure, the write's own exceptions included
            os.remove(temporary)


def write_checked(path, payload):
    """SHA-1 of payload (20 bytes), then payload, atomically (cache entries, checkpoints)."""
    atomic_write(path, lambda f: f.write(hashlib.sha1(payload).digest() + payload))


def read_checked(path, needed=False):
    """write_checked's payload in path; None if missing, damaged or truncated, or stop if needed."""
    stored = pathlib.Path(path).read_bytes() if os.path.isfile(path) else b""
    if hashlib.sha1(stored[20:]).digest() == stored[:20]:
        return stored[20:]
    if needed:
        raise SystemExit(f"error: {path}: missing, damaged or truncated (its SHA-1 does not "
                         f"match); train the run again (--overwrite)")


def check_new_output(path, overwrite, option="--out"):
    """Refuse a file output that is a folder, or that exists without --overwrite (nothing lost)."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {option} {path}: is a folder; pass a file name")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path}: exists; pass --overwrite to replace it or a new {option}")


def write_json(obj, path):
    """Strict JSON (NaN/inf -> null), written atomically; returns path."""
    atomic_write(path, lambda f: json.dump(_to_json(obj), f, indent=2, allow_nan=False), "w")
    return path


# What a run, predict.py and compare write (names or fnmatch patterns): all --overwrite moves
RUN_FILES = ("config.json", "metrics.json", "predictions.csv", "report.txt", "checkpoint.pt",
             "best.pt", "confusion_matrix.png", "curves.png", "reliability.png", "captions.csv",
             "predictions_*.csv", "compare_*.json", "explain")


@contextlib.contextmanager
def run_folder(out_dir, overwrite, resume):
    """with run_folder(...): the run. Refuse out_dir while another live run holds its .lock (a pid),
    or with RUN_FILES but no --resume or --overwrite (moves them to replaced/ till it completes)."""
    lock, replaced = os.path.join(out_dir, ".lock"), os.path.join(out_dir, "replaced")
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, ProcessLookupError, ValueError):
        pid = int(pathlib.Path(lock).read_text())
        if pid != os.getpid():  # our own pid: an earlier run of this process, interrupted
            os.kill(pid, 0)  # raises when that process is gone
            raise SystemExit(f"error: {out_dir}: another run (pid {pid}) is writing here now; "
                             f"wait for it or choose another --out")
    is_ours = lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILES)
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    for name in names:  # a killed run's temporary files (no pattern matches their .tmp<pid>)
        if ".tmp" in name and is_ours(name.split(".tmp")[0]):
            os.remove(os.path.join(out_dir, name))
    ours = sorted(filter(is_ours, names))
    if ours and not (overwrite or resume):
        raise SystemExit(f"error: {out_dir}: run folder exists; pass --resume {out_dir} to "
                         f"continue it, --overwrite to replace it, or --out for a new folder")
    try:
        os.makedirs(replaced, exist_ok=True)  # the run deletes it once it completes
        pathlib.Path(lock).write_text(str(os.getpid()))
    except OSError as error:
        raise SystemExit(f"error: --out {out_dir}: cannot write there ({error.strerror})")
    kept = os.listdir(replaced)  # not empty: a failed run left the last good one there
    for name in ours if not resume else []:
        path = os.path.join(out_dir, name)
        if kept:  # the failed run's own files
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        else:
            os.replace(path, os.path.join(replaced, name))
    if ours and not resume:
        print(f"note: the earlier run is kept in {replaced}/ until this one completes")
    completed = False
    try:
        yield
        completed = True
    except KeyboardInterrupt:
        raise SystemExit(f"error: stopped (Ctrl-C); continue from its last finished epoch with "
                         f"--resume {out_dir}") from None
    finally:
        if completed or not os.listdir(replaced):
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            print(f"note: the run did not complete; the earlier run it replaces is kept in "
                  f"{replaced}/ (move its files back to restore it)")
        os.remove(lock)


def run_config(run_dir):
    """run_dir/config.json, the run's options and split; {"args": {}} when there is none."""
    path = os.path.join(run_dir, "config.json")
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        return {"args": {}}
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: cannot read the run's options ({error}); pass a run "
                         f"folder made by a training script") from None


def _new_figure(width=5.0, height=4.5, columns=1):
    """A matplotlib Figure (no pyplot global state; savefig picks the PNG canvas) and its Axes."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="tight")
    return figure, figure.subplots(1, columns)


def plot_reliability(y_true, probs_before, probs_after, path):
    """Accuracy per confidence bin, ECE in the legend; before and after side by side if given."""
    sets = [("model", probs_before)] if probs_after is None else [
        ("before calibration", probs_before), ("after calibration", probs_after)]
    width = 1 / ECE_BINS / len(sets)  # of a bar
    figure, axes = _new_figure()
    for i, (label, probs) in enumerate(sets):
        bin_accuracy = np.nan_to_num(calibration_bins(y_true, probs)[1])  # 0 for an empty bin
        label += f" (ECE {expected_calibration_error(y_true, probs):.4f})"
        axes.bar(np.arange(ECE_BINS) / ECE_BINS + i * width, bin_accuracy, width, align="edge",
                 edgecolor="black", label=label)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    axes.set(xlabel="Confidence (top-1 probability)", ylabel="Accuracy", xlim=(0, 1),
             ylim=(0, 1), title="Reliability diagram")
    axes.legend(loc="upper left")
    figure.savefig(path, dpi=150)


def write_run_folder(out_dir, metrics, history, test_paths, y_test, test_probs, class_names,
                     header, calibrated_probs=None):
    """metrics.json, predictions.csv, report.txt (header + the paper's table) and the figures."""
    y_pred = test_probs.argmax(axis=1)
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    rows = [["path", "label", "pred"] + [f"p_{name}" for name in class_names]] + [
        [path, class_names[label], class_names[pred], *(f"{p:.6f}" for p in probs)]
        for path, label, pred, probs in zip(test_paths, y_test, y_pred, test_probs, strict=True)]
    atomic_write(os.path.join(out_dir, "predictions.csv"),
                 lambda file: csv.writer(file).writerows(rows), "w")
    report = f"{header.rstrip()}\n\n{classification_report(y_test, y_pred, class_names)}\n"
    atomic_write(os.path.join(out_dir, "report.txt"), lambda file: file.write(report), "w")
    figure, axes = _new_figure()  # confusion matrix: rows = true, columns = predicted, counts
    counts = confusion_matrix(y_test, y_pred, len(class_names))
    axes.imshow(counts, cmap="Blues")
    for (true_class, pred_class), count in np.ndenumerate(counts):
        color = "white" if count > counts.max() / 2 else "black"
        axes.text(pred_class, true_class, str(count), ha="center", va="center", color=color)
    axes.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    axes.set(yticks=range(len(class_names)), yticklabels=class_names, xlabel="Predicted class",
             ylabel="True class", title=f"test accuracy {accuracy(y_test, y_pred):.4f}")
    figure.savefig(os.path.join(out_dir, "confusion_matrix.png"), dpi=150)
    plot_reliability(y_test, test_probs, calibrated_probs, os.path.join(out_dir, "reliability.png"))
    if history:
        plot_curves(history, os.path.join(out_dir, "curves.png"), "accuracy", "train (views, and "
                    "their attacked copies 1:1)" if "exact" in metrics.get(
                        "adversarial_training", "") else "train (augmented views)")


def plot_curves(history, path, score, train_label="train (augmented views)"):
    """curves.png: loss and score (accuracy; a captioner's: cider) per epoch of the training views
    and the selection split (view 0), as far as history has them."""
    figure, panels = _new_figure(10, 4, columns=2)
    epochs = [row["epoch"] for row in history]
    for panel, metric in zip(panels, ("loss", score)):
        for key, label in (("train", train_label), ("select", "selection (view 0)")):
            if f"{key}_{metric}" in history[0]:
                panel.plot(epochs, [row[f"{key}_{metric}"] for row in history], "o-", label=label)
        panel.set(xlabel="epoch", ylabel=metric)
        panel.legend()
    figure.savefig(path, dpi=120)


def report_run(out_dir, metrics, outputs, test_paths, leaky, class_names, history,
               calibrate_on_val=False, notes=""):
    """Adds to metrics (the run's facts so far) metrics_dict and mean cross-entropy of each split
    in outputs {split: (logits (N, C), labels (N,))}, of the test images not in leaky (paths with
    a copy in training) and the calibration fitted on validation; writes the run folder, prints."""
    test_logits, y_test = outputs["test"]
    keep = np.array([path not in leaky for path in test_paths])
    if leaky and keep.any():
        outputs = outputs | {"test_leak_free": (test_logits[keep], y_test[keep])}
    for name, (logits, y_true) in outputs.items():
        log_probs = special.log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # (N, C)
        loss = -float(np.mean(log_probs[np.arange(len(y_true)), y_true])) if len(y_true) else None
        probs = np.exp(log_probs)
        metrics[name] = dict(metrics_dict(y_true, probs.argmax(1), probs, class_names), loss=loss)
    metrics["n_test_with_train_copy"] = len(leaky)
    headline = f"test accuracy {metrics['test']['accuracy']:.4f}; {len(leaky)} of {len(keep)} " \
               f"test images have an exact or transformed copy in training"
    if "test_leak_free" in outputs:
        metrics["test_leak_free"]["n_test_with_train_copy"] = len(leaky)
        headline += f", on the other {keep.sum()} (copy-free, not patient-level: neighbouring " \
                    f"slices stay): {metrics['test_leak_free']['accuracy']:.4f}"
    if "test_fgsm" in metrics:
        fgsm, pgd = metrics["test_fgsm"], metrics["test_pgd"]
        headline += f"; under FGSM {fgsm['accuracy']:.4f}, PGD {pgd['accuracy']:.4f} (clean " \
                    f"{fgsm['clean_accuracy']:.4f} on those {fgsm['n_attacked']} images)"
    if calibrate_on_val:  # temperature, class offsets and tumour threshold fitted on validation
        metrics["calibration"] = calibrate(*outputs["val"], test_logits, y_test, class_names)
    calibrated = metrics["calibration"].pop("test_probs") if calibrate_on_val else None
    header = f"{metrics['model']} seed {metrics['seed']}, best epoch {metrics['best_epoch']} " \
             f"chosen on the {metrics['selection']}\n{headline}\n{notes}"
    probs = special.softmax(np.asarray(test_logits, dtype=np.float64), axis=1)
    write_run_folder(out_dir, metrics, history, test_paths, y_test, probs, class_names, header,
                     calibrated)
    print(f"{headline}; macro-F1 {metrics['test']['macro_f1']:.4f} (epoch {metrics['best_epoch']}, "
          f"selected on the {metrics['selection']}); results in {out_dir}/")
    return metrics


def read_predictions(path):
    """predictions.csv -> (paths, y_true, y_pred, probs (N, C), class names of the p_ columns)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: not found; pass a run folder made by a training script")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        header, rows = reader.fieldnames or [], list(reader)
    class_names = tuple(column[2:] for column in header if column.startswith("p_"))
    missing = [column for column in ("path", "label", "pred") if column not in header]
    if missing or not class_names:
        raise SystemExit(f"error: {path}: missing column(s) {missing or ['p_<class>']} in header "
                         f"{header}; expected path,label,pred,p_glioma,p_meningioma,...")
    class_index = {name: c for c, name in enumerate(class_names)}
    try:
        y_true = np.array([class_index[row["label"]] for row in rows], dtype=int)
        y_pred = np.array([class_index[row["pred"]] for row in rows], dtype=int)
        probs = np.array([[float(row["p_" + name]) for name in class_names] for row in rows])
    except (KeyError, ValueError, TypeError) as error:  # TypeError: a short (truncated) row
        raise SystemExit(f"error: {path}: bad label or probability, or a short row ({error!r}); "
                         f"rewrite the file (the run's predictions.csv: rerun or --resume it)")
    return [row["path"] for row in rows], y_true, y_pred, probs, class_names


# ---- compare two runs, summarise seeds ---------------------------------------------------------

def check_same_images(run_a, paths_a, run_b, paths_b):
    """Refuse runs on different images, or one run twice: compare and summary take one test set."""
    if sorted(paths_a) != sorted(paths_b) or len(set(paths_a)) < len(paths_a):
        only_a, only_b = sorted(set(paths_a) - set(paths_b)), sorted(set(paths_b) - set(paths_a))
        raise SystemExit(f"error: {run_a} and {run_b} were evaluated on different images: "
                         f"{len(only_a)} path(s) only in A (e.g. {only_a[:3]}), {len(only_b)} only "
                         f"in B (e.g. {only_b[:3]}), or a repeated path; use runs of one split")
    if os.path.realpath(run_a) == os.path.realpath(run_b):
        raise SystemExit(f"error: {run_a} and {run_b} are one run; pass each run once")


def compare_runs(run_a, run_b, method=CI_METHOD, n_resamples=N_RESAMPLES, seed=SEED):
    """Two runs on the same images (matched by path): metrics with bootstrap CIs, and McNemar."""
    paths_a, y_true, pred_a, _, classes = read_predictions(os.path.join(run_a, "predictions.csv"))
    paths_b, true_b, pred_b, _, classes_b = read_predictions(os.path.join(run_b, "predictions.csv"))
    check_same_images(run_a, paths_a, run_b, paths_b)
    row_in_b = {path: row for row, path in enumerate(paths_b)}
    order = [row_in_b[path] for path in paths_a]  # B's rows in A's order
    true_b, pred_b = true_b[order], pred_b[order]
    if classes_b != classes or np.any(true_b != y_true):
        raise SystemExit(f"error: {run_a}, {run_b}: other classes or true labels; use one data set")
    options = {"method": method, "n_resamples": n_resamples, "seed": seed}
    result = {"run_a": run_a, "run_b": run_b, "n_images": len(y_true), "class_names": classes,
              "ci_method": method, "n_resamples": n_resamples, "seed": seed,
              "confidence_level": CONFIDENCE_LEVEL}
    for key, run, y_pred in (("a", run_a, pred_a), ("b", run_b, pred_b)):
        _, _, f1, support = precision_recall_f1(y_true, y_pred, len(classes))
        result[key] = {"run": run, "accuracy": accuracy(y_true, y_pred),
                       "accuracy_ci": accuracy_ci(y_pred == y_true, **options),
                       "macro_f1": macro_average(f1, support),
                       "macro_f1_ci": macro_f1_ci(y_true, y_pred, len(classes), **options),
                       "per_class_f1": dict(zip(classes, f1))}
    correct_a, correct_b = pred_a == y_true, pred_b == y_true
    result["accuracy_difference"] = result["a"]["accuracy"] - result["b"]["accuracy"]
    result["accuracy_difference_ci"] = accuracy_difference_ci(correct_a, correct_b, **options)
    return _to_json(result | mcnemar(correct_a, correct_b))


def _number(value, bounds=None):  # 4 decimals ('n/a' for None: undefined), then the interval
    text = "n/a" if value is None else f"{value:.4f}"
    return text if bounds is None else f"{text} ({_number(bounds[0])}, {_number(bounds[1])})"


def _markdown_table(header, rows):  # lines of a markdown table: header cells, then rows of cells
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def format_comparison(result):
    """The `compare` result as markdown: one column per run, then the paired statistics."""
    runs = (result["a"], result["b"])
    rows = [["accuracy (CI)", *(_number(run["accuracy"], run["accuracy_ci"]) for run in runs)],
            ["macro-F1 (CI)", *(_number(run["macro_f1"], run["macro_f1_ci"]) for run in runs)]]
    rows += [[f"F1 {name}", *(_number(run["per_class_f1"][name]) for run in runs)]
             for name in result["class_names"]]
    difference = _number(result["accuracy_difference"], result["accuracy_difference_ci"])
    counts = " / ".join(str(result[key]) for key in
                        ("both_correct", "only_a_correct", "only_b_correct", "both_wrong"))
    return "\n".join([
        f"{result['n_images']} images; {result['confidence_level']:.0%} CIs: {result['ci_method']} "
        f"bootstrap, {result['n_resamples']} resamples, seed {result['seed']}.", "",
        *_markdown_table(["", f"A: {runs[0]['run']}", f"B: {runs[1]['run']}"], rows), "",
        f"accuracy A - B (CI): {difference}",
        f"both correct / only A / only B / both wrong: {counts}",
        f"McNemar: exact p {result['mcnemar_exact_p']:.4g} (binomial, two-sided); chi2 "
        f"{result['mcnemar_chi2']:.4f} (continuity-corrected), p {result['mcnemar_chi2_p']:.4g}"])


def summarize_runs(run_dirs, section="test"):
    """Mean and sample std (ddof=1; None for one run) of each number in the runs' metrics.json."""
    values = {}  # metric name -> one value per run (null -> NaN)
    test_paths = [read_predictions(os.path.join(run, "predictions.csv"))[0] for run in run_dirs]
    for k, run in enumerate(run_dirs):  # every pair: one test set, and no run counted twice
        for other in range(k):
            check_same_images(run_dirs[other], test_paths[other], run, test_paths[k])
        metrics_path = os.path.join(run, "metrics.json")
        if not os.path.isfile(metrics_path):
            raise SystemExit(f"error: {metrics_path}: not found; is {run} a finished run folder?")
        split = json.loads(pathlib.Path(metrics_path).read_text()).get(section)
        if not split:  # missing, or null when the split was empty
            raise SystemExit(f"error: {metrics_path}: no {section!r} metrics; pass finished runs")
        scalars = {key: value for key, value in split.items()
                   if value is None or type(value) in (int, float)}
        scalars.update({f"f1_{name}": scores["f1"] for name, scores in split["per_class"].items()})
        if values and set(scalars) != set(values):
            raise SystemExit(f"error: {metrics_path}: metrics {sorted(set(scalars) ^ set(values))} "
                             "are not in every run; summarise runs made by the same script")
        for name, value in scalars.items():
            values.setdefault(name, []).append(np.nan if value is None else float(value))
    metrics = {name: {"mean": np.mean(run_values),
                      "std": np.std(run_values, ddof=1) if len(run_values) > 1 else np.nan,
                      "values": run_values} for name, run_values in values.items()}
    return _to_json({"runs": list(run_dirs), "section": section, "n_runs": len(run_dirs),
                     "std_definition": "sample std over runs (ddof=1); null for one run",
                     "metrics": metrics})


def format_summary(summary):
    """The `summary` result as markdown: metric | mean | std | per-run values."""
    rows = [[name, _number(metric["mean"]), _number(metric["std"]),
             ", ".join(map(_number, metric["values"]))]
            for name, metric in summary["metrics"].items()]
    title = f"{summary['section']} metrics, {summary['n_runs']} runs: mean +- sample std (ddof=1)."
    return "\n".join([title, "", *_markdown_table(["metric", "mean", "std", "values"], rows)])


def main(argv=None):
    """Command line: `compare RUN_A RUN_B` or `summary RUN...` (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Compare runs or summarise seeds of tumor-vlm.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                  help="two runs on the same images: bootstrap CIs, McNemar")
    compare.add_argument("run_a", help="run folder A (with predictions.csv)")
    compare.add_argument("run_b", help="run folder B (with predictions.csv), same test images")
    compare.add_argument("--ci-method", default=CI_METHOD, choices=("BCa", "percentile"),
                         help="bootstrap interval method")
    compare.add_argument("--n-resamples", type=int, default=N_RESAMPLES, help="resamples per CI")
    compare.add_argument("--seed", type=int, default=SEED, help="seed of the bootstrap resampling")
    summary = commands.add_parser("summary", help="mean +- sample std of test metrics over runs")
    summary.add_argument("runs", nargs="+", help="run folders (with metrics.json), one per seed")
    for command, default in ((compare, "RUN_A/compare_<name of RUN_B>.json"),
                             (summary, "printed only")):
        command.add_argument("--out", "--json", help=f"output JSON (default: {default})")
        command.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    compared = args.command == "compare"
    if compared and not args.out:  # beside run A, named after run B
        args.out = os.path.join(args.run_a, f"compare_{pathlib.Path(args.run_b).name}.json")
    if args.out:  # the one input check: an output is never replaced without --overwrite
        check_new_output(args.out, args.overwrite)
    result = (compare_runs(args.run_a, args.run_b, args.ci_method, args.n_resamples, args.seed)
              if compared else summarize_runs(args.runs))
    print(format_comparison(result) if compared else format_summary(result))
    if args.out:
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
