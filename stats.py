"""Metrics and statistics for tumor-vlm: per-class scores, ROC/PR, calibration, McNemar, bootstrap.

The training scripts call `metrics_dict`, `classification_report`, `plot_confusion_matrix`,
`plot_run_figures` and `summarize_runs`; the command line compares finished run folders:

    python stats.py compare runs/clip_seed0 runs/blip_seed0   # CIs per run, paired diff, McNemar
    python stats.py summary runs/clip_seed0 runs/clip_seed1 runs/clip_seed2   # mean +- std

NumPy and SciPy only (matplotlib is imported inside the plotting functions), so every number
can be audited without torch or a GPU. tests/test_stats.py checks each metric against
scikit-learn on random inputs with ties, McNemar against published worked examples, and the
bootstrap intervals' coverage on simulated data (python -m pytest -q tests/test_stats.py).

Conventions: y_true, y_pred are int class indices (N,); probs is (N, C) with rows summing to 1;
a confusion matrix has rows = true class, columns = predicted class.
"""
import argparse
import csv
import json
import math
import os
from collections import Counter

import numpy as np
from scipy import stats as scipy_stats

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")  # class index order of the project
CI_METHOD = "BCa"          # bootstrap interval: 'BCa' (bias-corrected, accelerated) or 'percentile'
N_RESAMPLES = 2000         # bootstrap resamples per interval
CONFIDENCE_LEVEL = 0.95    # two-sided level of every interval
SEED = 0                   # seed of the bootstrap resampling (np.random.default_rng)
ECE_BINS = 15              # equal-width confidence bins of the expected calibration error


# ----------------------------------------------------------------------------------------------
# Classification metrics from hard predictions

def _safe_divide(numerator, denominator):
    """numerator / denominator elementwise, 0.0 where the denominator is 0 (zero_division=0)."""
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def accuracy(y_true, y_pred):
    """Fraction of images whose predicted class equals the true class."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true, y_pred, n_classes):
    """Counts (C, C) int: entry [t, p] = number of images of true class t predicted as class p."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} holds class index {labels.min()}..{labels.max()}, outside "
                             f"0..{n_classes - 1}: pass n_classes = number of class names")
    flat_index = y_true * n_classes + y_pred  # one bincount bin per (true, predicted) pair
    counts = np.bincount(flat_index, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def precision_recall_f1(y_true, y_pred, n_classes):
    """Per-class precision, recall, F1 and support, each an array of length C.

    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN) (the
    harmonic mean of the two); a zero denominator gives 0, as sklearn's zero_division=0.
    Support = number of images whose true class is c.
    """
    counts = confusion_matrix(y_true, y_pred, n_classes)
    true_pos = np.diag(counts)
    predicted = counts.sum(axis=0)  # TP + FP
    support = counts.sum(axis=1)    # TP + FN
    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, support)
    f1 = _safe_divide(2 * true_pos, predicted + support)
    return precision, recall, f1, support


def sensitivity_specificity(y_true, y_pred, n_classes):
    """Per-class one-vs-rest sensitivity TP / (TP + FN) and specificity TN / (TN + FP).

    Sensitivity is the recall of class c; specificity is the fraction of images of the other
    classes that are not predicted as c. A zero denominator gives 0.
    """
    counts = confusion_matrix(y_true, y_pred, n_classes)
    true_pos = np.diag(counts)
    false_neg = counts.sum(axis=1) - true_pos
    false_pos = counts.sum(axis=0) - true_pos
    true_neg = counts.sum() - true_pos - false_neg - false_pos
    sensitivity = _safe_divide(true_pos, true_pos + false_neg)
    specificity = _safe_divide(true_neg, true_neg + false_pos)
    return sensitivity, specificity


def top_k_accuracy(y_true, probs, k):
    """Fraction of images whose true class is among the k most probable classes.

    A hit is counted when fewer than k classes have a strictly higher probability than the
    true class, so ties go in the model's favour (sklearn's top_k_accuracy_score breaks ties
    by class index instead; the two agree whenever the probabilities of a row are distinct).
    """
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true, dtype=int)
    true_class_prob = probs[np.arange(len(y_true)), y_true]          # (N,)
    n_classes_above = (probs > true_class_prob[:, None]).sum(axis=1)  # (N,)
    return float(np.mean(n_classes_above < k))


# ----------------------------------------------------------------------------------------------
# Ranking metrics from probabilities: one-vs-rest ROC and precision-recall

def _ranked_counts(is_positive, scores):
    """False/true positive counts when thresholding at each distinct score, high to low.

    Returns (false_pos, true_pos, thresholds): the images with score >= thresholds[i] are
    called positive. Tied scores share one threshold, so a tie moves the ROC curve along a
    diagonal: that is what gives a tied positive/negative pair half credit in the AUC.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_each_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_pos = np.cumsum(is_positive[order])[last_of_each_tie]
    false_pos = last_of_each_tie + 1 - true_pos
    return false_pos, true_pos, sorted_scores[last_of_each_tie]


def roc_curve(is_positive, scores):
    """ROC points (fpr, tpr, thresholds) from threshold +inf (0, 0) down to the lowest score (1, 1).

    Rates are NaN when there are no positives (tpr) or no negatives (fpr).
    """
    false_pos, true_pos, thresholds = _ranked_counts(is_positive, scores)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> NaN, documented above
        fpr = np.r_[0, false_pos] / false_pos[-1]
        tpr = np.r_[0, true_pos] / true_pos[-1]
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_curve(is_positive, scores):
    """Precision-recall points (precision, recall, thresholds), thresholds from high to low.

    The first point, threshold +inf (nothing called positive), is recall 0 and precision 1 by
    convention, as in sklearn. Recall is NaN when there are no positives.
    """
    false_pos, true_pos, thresholds = _ranked_counts(is_positive, scores)
    precision = true_pos / (true_pos + false_pos)  # never 0/0: each threshold calls >= 1 positive
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_pos / true_pos[-1]
    return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds]


def _nan_mean(values):
    """Mean of the non-NaN values; NaN if there are none."""
    values = np.asarray(values, dtype=float)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def roc_auc_ovr(y_true, probs):
    """One-vs-rest ROC AUC per class (array of length C) and its macro mean (float).

    AUC of class c = area under the ROC curve of the scores probs[:, c] for "is class c",
    computed with the trapezoid rule over all distinct thresholds. It equals the probability
    that a random class-c image scores higher than a random other image, ties counting one
    half (as sklearn's roc_auc_score). A class absent from y_true (or making up all of it) has
    no ROC curve: its AUC is NaN and the macro mean skips it.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    per_class = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        is_positive = y_true == c
        if 0 < is_positive.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(is_positive, probs[:, c])
            per_class[c] = np.trapezoid(tpr, fpr)
    return per_class, _nan_mean(per_class)


def average_precision(y_true, probs):
    """One-vs-rest average precision per class (array of length C) and its macro mean (float).

    AP = sum_i (R_i - R_{i-1}) P_i over the distinct thresholds from high to low: the precision
    at each threshold weighted by the recall it adds, a step function with no interpolation
    (sklearn's average_precision_score). A class absent from y_true has AP NaN, skipped by
    the macro mean.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    per_class = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        if np.any(y_true == c):
            precision, recall, _ = pr_curve(y_true == c, probs[:, c])
            per_class[c] = np.sum(np.diff(recall) * precision[1:])
    return per_class, _nan_mean(per_class)


# ----------------------------------------------------------------------------------------------
# Calibration

def calibration_bins(y_true, probs, n_bins=ECE_BINS):
    """Per confidence bin: mean confidence, accuracy and image count (arrays of length n_bins).

    Confidence = the highest class probability, prediction = its class (argmax). Bin b holds
    confidences in (b / n_bins, (b + 1) / n_bins]; empty bins have confidence and accuracy NaN.
    """
    probs = np.asarray(probs, dtype=float)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bin_index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore"):  # empty bins: 0/0 -> NaN
        mean_confidence = np.bincount(bin_index, confidence, minlength=n_bins) / count
        bin_accuracy = np.bincount(bin_index, correct, minlength=n_bins) / count
    return mean_confidence, bin_accuracy, count


def expected_calibration_error(y_true, probs, n_bins=ECE_BINS):
    """ECE = sum over bins of (images in bin / N) * |accuracy - mean confidence| (Guo et al. 2017).

    Bins and confidence as in `calibration_bins` (equal width, top-1 probability).
    """
    mean_confidence, bin_accuracy, count = calibration_bins(y_true, probs, n_bins)
    filled = count > 0
    weights = count[filled] / count.sum()
    return float(np.sum(weights * np.abs(bin_accuracy[filled] - mean_confidence[filled])))


# ----------------------------------------------------------------------------------------------
# All metrics of one split, and the paper's table

def _to_json(value):
    """Plain-Python copy of nested dicts/lists/NumPy values for json; NaN becomes None (null)."""
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def metrics_dict(y_true, y_pred, probs, class_names):
    """Every metric of one split as a JSON-ready dict (plain floats/ints/lists; NaN -> None).

    Keys: n, accuracy, macro_f1, weighted_f1 (weighted by support), macro_precision,
    macro_recall, per_class {name: {precision, recall, f1, support, sensitivity, specificity,
    roc_auc, pr_auc}}, confusion_matrix (rows = true), and from probs: top2_accuracy (only
    for C > 2), macro_roc_auc, macro_pr_auc, ece. With probs=None the probability keys
    (including per-class roc_auc, pr_auc) are left out. Macro means run over all C classes.
    """
    n_classes = len(class_names)
    precision, recall, f1, support = precision_recall_f1(y_true, y_pred, n_classes)
    sensitivity, specificity = sensitivity_specificity(y_true, y_pred, n_classes)
    per_class = {name: {"precision": precision[c], "recall": recall[c], "f1": f1[c],
                        "support": support[c], "sensitivity": sensitivity[c],
                        "specificity": specificity[c]} for c, name in enumerate(class_names)}
    result = {
        "n": len(y_true),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": f1.mean(),
        "weighted_f1": _safe_divide(f1 @ support, support.sum()),
        "macro_precision": precision.mean(),
        "macro_recall": recall.mean(),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, n_classes),
    }
    if probs is not None:
        roc_auc, macro_roc_auc = roc_auc_ovr(y_true, probs)
        pr_auc, macro_pr_auc = average_precision(y_true, probs)
        for c, name in enumerate(class_names):
            per_class[name].update(roc_auc=roc_auc[c], pr_auc=pr_auc[c])
        if n_classes > 2:
            result["top2_accuracy"] = top_k_accuracy(y_true, probs, k=2)
        result.update(macro_roc_auc=macro_roc_auc, macro_pr_auc=macro_pr_auc,
                      ece=expected_calibration_error(y_true, probs))
    return _to_json(result)


def classification_report(y_true, y_pred, class_names):
    """Plain-text table in the layout of the paper's Tables 3-4, 2 decimals, with support."""
    precision, recall, f1, support = precision_recall_f1(y_true, y_pred, len(class_names))
    total = int(support.sum())
    weights = _safe_divide(support, total)
    width = max(len("Overall Accuracy"), *(len(name) for name in class_names))
    row = f"{{:<{width}}}  {{:>9}}  {{:>6}}  {{:>8}}  {{:>7}}"
    lines = [row.format("Class", "Precision", "Recall", "F1-score", "Support")]
    for c, name in enumerate(class_names):
        lines.append(row.format(name, f"{precision[c]:.2f}", f"{recall[c]:.2f}",
                                f"{f1[c]:.2f}", int(support[c])))
    lines.append(row.format("Overall Accuracy", "", "", f"{accuracy(y_true, y_pred):.2f}", total))
    lines.append(row.format("Macro Avg", f"{precision.mean():.2f}", f"{recall.mean():.2f}",
                            f"{f1.mean():.2f}", total))
    lines.append(row.format("Weighted Avg", f"{weights @ precision:.2f}",
                            f"{weights @ recall:.2f}", f"{weights @ f1:.2f}", total))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Statistical tests: McNemar and bootstrap confidence intervals

def mcnemar(correct_a, correct_b, continuity_correction=True):
    """McNemar's test that two classifiers have equal accuracy on the same images.

    Only discordant images carry information: b = images only A gets right, c = only B.
    Under H0, b ~ Binomial(b + c, 1/2). Returns the 2x2 counts (both_correct, only_a_correct,
    only_b_correct, both_wrong), mcnemar_exact_p (two-sided exact binomial test),
    mcnemar_chi2 = (|b - c| - 1)^2 / (b + c) (no -1 if continuity_correction=False; b = c
    gives 1 / (b + c), as R's mcnemar.test) and mcnemar_chi2_p (chi-square, 1 dof).
    b + c = 0 (the classifiers never disagree) gives chi2 0 and both p-values 1.
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correct_a has shape {correct_a.shape} but correct_b {correct_b.shape}: "
                         "McNemar needs both classifiers' results on the same images")
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    exact_p, chi2, chi2_p = 1.0, 0.0, 1.0
    if discordant > 0:
        exact_p = scipy_stats.binomtest(only_a, discordant, p=0.5).pvalue
        correction = 1.0 if continuity_correction else 0.0
        chi2 = (abs(only_a - only_b) - correction) ** 2 / discordant
        chi2_p = scipy_stats.chi2.sf(chi2, df=1)
    return {"both_correct": int(np.sum(correct_a & correct_b)), "only_a_correct": only_a,
            "only_b_correct": only_b, "both_wrong": int(np.sum(~correct_a & ~correct_b)),
            "mcnemar_exact_p": float(exact_p), "mcnemar_chi2": float(chi2),
            "mcnemar_chi2_p": float(chi2_p)}


def bootstrap_ci(samples, statistic, method=CI_METHOD, n_resamples=N_RESAMPLES, seed=SEED,
                 confidence_level=CONFIDENCE_LEVEL):
    """(low, high) bootstrap interval of statistic(*samples) by scipy.stats.bootstrap.

    The samples are equal-length arrays, one entry per image, resampled jointly (paired=True:
    the same image indices for every array). statistic(*arrays, axis=-1) must be vectorised
    over leading axes. If every resample gives the same value (e.g. all images correct) the
    interval is (value, value); BCa would be undefined there.
    """
    options = {"paired": True, "vectorized": True, "confidence_level": confidence_level}
    result = scipy_stats.bootstrap(samples, statistic, n_resamples=n_resamples,
                                   method="percentile", rng=np.random.default_rng(seed), **options)
    if np.ptp(result.bootstrap_distribution) == 0:
        value = float(result.bootstrap_distribution[0])
        return value, value
    if method.lower() != "percentile":  # same resamples, only the interval rule changes
        result = scipy_stats.bootstrap(samples, statistic, n_resamples=0, method=method,
                                       bootstrap_result=result, **options)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _mean(values, axis=-1):
    """Mean along axis (the statistic of accuracy, vectorised for scipy.stats.bootstrap)."""
    return np.mean(values, axis=axis)


def _mean_difference(values_a, values_b, axis=-1):
    """mean(values_a) - mean(values_b) along axis (paired accuracy difference).

    Computed as mean(a - b): the sum of the 0/1 differences is an exact integer, so resamples
    with the same counts give bit-identical values, which BCa's bias estimate compares with
    the observed difference (mean(a) - mean(b) can differ from it in the last bit).
    """
    return np.mean(values_a - values_b, axis=axis)


def macro_f1_batched(y_true, y_pred, n_classes):
    """Macro-F1 of every row of (..., N) label arrays at once -> (...).

    Speed-up for the bootstrap: instead of a Python loop over 2000 resamples, one bincount
    over flat index (row, true, predicted) gives all (rows, C, C) confusion matrices; each
    row's F1 is then exactly that of precision_recall_f1.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    leading_shape = y_true.shape[:-1]
    y_true = y_true.reshape(-1, y_true.shape[-1])  # (rows, N)
    y_pred = y_pred.reshape(-1, y_pred.shape[-1])
    n_rows = y_true.shape[0]
    flat_index = (np.arange(n_rows)[:, None] * n_classes + y_true) * n_classes + y_pred
    counts = np.bincount(flat_index.ravel(), minlength=n_rows * n_classes * n_classes)
    counts = counts.reshape(n_rows, n_classes, n_classes)  # (rows, true, predicted)
    true_pos = np.diagonal(counts, axis1=1, axis2=2)
    f1 = _safe_divide(2 * true_pos, counts.sum(axis=1) + counts.sum(axis=2))  # (rows, C)
    return f1.mean(axis=-1).reshape(leading_shape)


def accuracy_ci(correct, **bootstrap_options):
    """(low, high) bootstrap interval of the accuracy, from per-image correctness (N,) bool.

    bootstrap_options: method, n_resamples, seed, confidence_level, as in bootstrap_ci.
    """
    return bootstrap_ci((np.asarray(correct, dtype=float),), _mean, **bootstrap_options)


def macro_f1_ci(y_true, y_pred, n_classes, **bootstrap_options):
    """(low, high) bootstrap interval of macro-F1: image indices resampled, F1 recomputed
    over all n_classes classes (a class missing from a resample scores F1 = 0 there)."""
    def macro_f1_statistic(true_rows, pred_rows, axis=-1):
        return macro_f1_batched(true_rows, pred_rows, n_classes)
    return bootstrap_ci((np.asarray(y_true), np.asarray(y_pred)), macro_f1_statistic,
                        **bootstrap_options)


def accuracy_difference_ci(correct_a, correct_b, **bootstrap_options):
    """(low, high) paired bootstrap interval of accuracy(A) - accuracy(B) on the same images."""
    samples = (np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float))
    return bootstrap_ci(samples, _mean_difference, **bootstrap_options)


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on an Agg canvas: no pyplot global state, no display needed)

def _new_figure(width=5.0, height=4.5):
    """A matplotlib Figure drawn by the Agg (PNG) backend, and its single Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="tight")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_confusion_matrix(cm, class_names, path, title):
    """Write the confusion matrix (rows = true, columns = predicted) as a PNG with counts."""
    cm = np.asarray(cm)
    figure, axes = _new_figure()
    axes.imshow(cm, cmap="Blues")
    for (true_class, pred_class), count in np.ndenumerate(cm):
        dark_cell = count > cm.max() / 2
        axes.text(pred_class, true_class, str(count), ha="center", va="center",
                  color="white" if dark_cell else "black")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=30, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="Predicted class", ylabel="True class", title=title)
    figure.savefig(path, dpi=150)


def plot_run_figures(y_true, probs, class_names, out_dir):
    """Write roc.png, pr.png (one-vs-rest curve per class, AUC/AP in the legend) and
    reliability.png (accuracy per confidence bin, ECE in the title) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    roc_auc, _ = roc_auc_ovr(y_true, probs)
    pr_auc, _ = average_precision(y_true, probs)
    for kind in ("roc", "pr"):
        figure, axes = _new_figure()
        for c, name in enumerate(class_names):
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
                axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc[c]:.3f})")
            else:
                precision, recall, _ = pr_curve(y_true == c, probs[:, c])
                # "pre": precision P_i holds over the recall step (R_{i-1}, R_i], as in AP
                axes.step(recall, precision, where="pre", label=f"{name} (AP {pr_auc[c]:.3f})")
        if kind == "roc":
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
            axes.set(xlabel="False positive rate", ylabel="True positive rate",
                     title="ROC (one-vs-rest)")
        else:
            axes.set(xlabel="Recall", ylabel="Precision", title="Precision-recall (one-vs-rest)")
        axes.legend(loc="lower right" if kind == "roc" else "lower left")
        figure.savefig(os.path.join(out_dir, f"{kind}.png"), dpi=150)

    mean_confidence, bin_accuracy, count = calibration_bins(y_true, probs)
    bin_width = 1.0 / len(count)
    figure, axes = _new_figure()
    bin_centres = (np.arange(len(count)) + 0.5) * bin_width
    axes.bar(bin_centres, np.nan_to_num(bin_accuracy), width=bin_width, edgecolor="black",
             label="accuracy")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    axes.plot(mean_confidence, bin_accuracy, "o", color="red", label="mean confidence")
    ece = expected_calibration_error(y_true, probs)
    axes.set(xlabel="Confidence (top-1 probability)", ylabel="Accuracy", xlim=(0, 1),
             ylim=(0, 1), title=f"Reliability diagram (ECE = {ece:.4f})")
    axes.legend(loc="upper left")
    figure.savefig(os.path.join(out_dir, "reliability.png"), dpi=150)


# ----------------------------------------------------------------------------------------------
# Run folders: predictions.csv, metrics.json, compare and summary

def read_predictions(path):
    """Read a run's predictions.csv -> (paths list, y_true, y_pred, probs (N, C), class_names).

    Header: path,label,pred,p_<class>... Class names and their order come from the p_
    columns; label and pred are class names, returned as indices into that order.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; a run folder needs the predictions.csv "
                                "written by the training script")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames or []
        rows = list(reader)
    class_names = tuple(column[2:] for column in header if column.startswith("p_"))
    missing = [column for column in ("path", "label", "pred") if column not in header]
    if missing or not class_names:
        raise ValueError(f"{path}: missing column(s) {missing or ['p_<class>']} in header "
                         f"{header}; expected path,label,pred,p_glioma,p_meningioma,...")
    class_index = {name: c for c, name in enumerate(class_names)}
    for line_number, row in enumerate(rows, start=2):
        for column in ("label", "pred"):
            if row[column] not in class_index:
                raise ValueError(f"{path}, line {line_number}: {column} {row[column]!r} is not "
                                 f"one of the classes of the p_ columns {class_names}")
    y_true = np.array([class_index[row["label"]] for row in rows], dtype=int)
    y_pred = np.array([class_index[row["pred"]] for row in rows], dtype=int)
    try:
        probs = np.array([[float(row["p_" + name]) for name in class_names] for row in rows])
    except ValueError as error:
        raise ValueError(f"{path}: a p_ column holds a non-number ({error})") from None
    return [row["path"] for row in rows], y_true, y_pred, probs.reshape(len(rows), -1), class_names


def _index_b_by_path(paths_a, paths_b, run_a, run_b):
    """For each of A's image paths, its row in B; a clear error if the two image sets differ."""
    for paths, run in ((paths_a, run_a), (paths_b, run_b)):
        duplicated = sorted(path for path, count in Counter(paths).items() if count > 1)
        if duplicated:
            raise ValueError(f"{run}/predictions.csv lists {len(duplicated)} path(s) more than "
                             f"once, e.g. {duplicated[:3]}: each image must appear once")
    row_in_b = {path: row for row, path in enumerate(paths_b)}
    only_a = [path for path in paths_a if path not in row_in_b]
    only_b = sorted(set(paths_b) - set(paths_a))
    if only_a or only_b:
        raise ValueError(f"{run_a} and {run_b} were evaluated on different images: "
                         f"{len(only_a)} path(s) only in A (e.g. {only_a[:3]}), {len(only_b)} only "
                         f"in B (e.g. {only_b[:3]}); compare runs made on the same split")
    return np.array([row_in_b[path] for path in paths_a], dtype=int)


def compare_runs(run_a, run_b, method=CI_METHOD, n_resamples=N_RESAMPLES, seed=SEED):
    """Compare two runs on the same images (matched by path) -> JSON-ready dict.

    Per run: accuracy and macro-F1 with bootstrap CIs, per-class F1. Paired: accuracy
    difference A - B with a paired bootstrap CI, and McNemar's test (`mcnemar` keys).
    """
    paths_a, y_true, pred_a, _, classes_a = read_predictions(os.path.join(run_a, "predictions.csv"))
    paths_b, true_b, pred_b, _, classes_b = read_predictions(os.path.join(run_b, "predictions.csv"))
    if classes_a != classes_b:
        raise ValueError(f"{run_a} has classes {classes_a} but {run_b} has {classes_b}")
    row_in_b = _index_b_by_path(paths_a, paths_b, run_a, run_b)
    true_b, pred_b = true_b[row_in_b], pred_b[row_in_b]
    if np.any(true_b != y_true):
        first = int(np.argmax(true_b != y_true))
        raise ValueError(f"{run_a} and {run_b} disagree on the true label of "
                         f"{int(np.sum(true_b != y_true))} image(s), e.g. {paths_a[first]}")
    options = {"method": method, "n_resamples": n_resamples, "seed": seed}
    per_run = {}
    for key, run, y_pred in (("a", run_a, pred_a), ("b", run_b, pred_b)):
        _, _, f1, _ = precision_recall_f1(y_true, y_pred, len(classes_a))
        per_run[key] = {"run": run, "accuracy": accuracy(y_true, y_pred),
                        "accuracy_ci": accuracy_ci(y_pred == y_true, **options),
                        "macro_f1": f1.mean(),
                        "macro_f1_ci": macro_f1_ci(y_true, y_pred, len(classes_a), **options),
                        "per_class_f1": dict(zip(classes_a, f1))}
    correct_a, correct_b = pred_a == y_true, pred_b == y_true
    return _to_json({
        "run_a": run_a, "run_b": run_b, "n_images": len(y_true), "class_names": classes_a,
        "ci_method": method, "n_resamples": n_resamples, "seed": seed,
        "confidence_level": CONFIDENCE_LEVEL, "a": per_run["a"], "b": per_run["b"],
        "accuracy_difference": per_run["a"]["accuracy"] - per_run["b"]["accuracy"],
        "accuracy_difference_ci": accuracy_difference_ci(correct_a, correct_b, **options),
        **mcnemar(correct_a, correct_b)})


def _format_number(value, digits=4):
    """Number with fixed decimals, or 'n/a' for None (an undefined metric)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_comparison(result):
    """The `compare` result as markdown: one row per run, then the paired statistics."""
    def ci(value, bounds):
        return f"{_format_number(value)} ({_format_number(bounds[0])}, {_format_number(bounds[1])})"
    classes = result["class_names"]
    lines = [f"Compared on {result['n_images']} images; {result['confidence_level']:.0%} CIs: "
             f"{result['ci_method']} bootstrap, {result['n_resamples']} resamples, "
             f"seed {result['seed']}.", "",
             "| run | accuracy (CI) | macro-F1 (CI) | "
             + " | ".join(f"F1 {c}" for c in classes) + " |",
             "|---" * (3 + len(classes)) + "|"]
    for key in ("a", "b"):
        run = result[key]
        f1s = " | ".join(_format_number(run["per_class_f1"][c]) for c in classes)
        lines.append(f"| {key.upper()}: {run['run']} | {ci(run['accuracy'], run['accuracy_ci'])} "
                     f"| {ci(run['macro_f1'], run['macro_f1_ci'])} | {f1s} |")
    difference = ci(result["accuracy_difference"], result["accuracy_difference_ci"])
    lines += ["", "| paired, A vs B | value |", "|---|---|",
              f"| accuracy A - B (CI) | {difference} |",
              f"| both correct / only A / only B / both wrong | {result['both_correct']} / "
              f"{result['only_a_correct']} / {result['only_b_correct']} / {result['both_wrong']} |",
              f"| McNemar exact p (binomial, two-sided) | {result['mcnemar_exact_p']:.4g} |",
              f"| McNemar chi2 (continuity-corrected), p | {result['mcnemar_chi2']:.4f}, "
              f"{result['mcnemar_chi2_p']:.4g} |"]
    return "\n".join(lines)


def _scalar_metrics(section):
    """Numbers of one metrics.json section, plus per-class F1 as f1_<class>; null -> NaN."""
    scalars = {}
    for key, value in section.items():
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            scalars[key] = float("nan") if value is None else float(value)
    for name, scores in section.get("per_class", {}).items():
        scalars[f"f1_{name}"] = float("nan") if scores["f1"] is None else float(scores["f1"])
    return scalars


def summarize_runs(run_dirs, section="test"):
    """Mean and sample std (ddof=1) over runs of every scalar metric of metrics.json[section].

    Per-class F1 is included as f1_<class>. Returns a JSON-ready dict {runs, section, n_runs,
    std_definition, metrics: {name: {mean, std, values}}}; std is None for a single run.
    All runs must report the same metrics.
    """
    if not run_dirs:
        raise ValueError("summary needs at least one run folder")
    values = {}  # metric name -> one value per run
    for run in run_dirs:
        metrics_path = os.path.join(run, "metrics.json")
        if not os.path.isfile(metrics_path):
            raise FileNotFoundError(f"{metrics_path}: not found; is {run} a finished run folder?")
        with open(metrics_path) as file:
            metrics = json.load(file)
        if not metrics.get(section):  # missing, or null when the split was empty
            raise ValueError(f"{metrics_path}: no {section!r} metrics (keys {sorted(metrics)})")
        scalars = _scalar_metrics(metrics[section])
        if values and set(scalars) != set(values):
            raise ValueError(f"{metrics_path}: metrics {sorted(set(scalars) ^ set(values))} are "
                             f"not in every run; summarise runs made by the same script")
        for name, value in scalars.items():
            values.setdefault(name, []).append(value)
    summary = {name: {"mean": np.mean(run_values),
                      "std": np.std(run_values, ddof=1) if len(run_values) > 1 else float("nan"),
                      "values": run_values} for name, run_values in values.items()}
    return _to_json({"runs": list(run_dirs), "section": section, "n_runs": len(run_dirs),
                     "std_definition": "sample standard deviation over runs (ddof=1); "
                                       "null for a single run",
                     "metrics": summary})


def format_summary(summary):
    """The `summary` result as markdown: metric | mean | std | per-run values."""
    lines = [f"{summary['section']} metrics over {summary['n_runs']} runs: mean +- sample std "
             "(ddof=1).", "", "| metric | mean | std | values |", "|---|---|---|---|"]
    for name, metric in summary["metrics"].items():
        values = ", ".join(_format_number(value) for value in metric["values"])
        lines.append(f"| {name} | {_format_number(metric['mean'])} | "
                     f"{_format_number(metric['std'])} | {values} |")
    return "\n".join(lines)


def _write_json(result, path):
    """Write result as indented JSON (strict: no NaN), saying if an existing file is replaced."""
    replaced = os.path.exists(path)
    with open(path, "w") as file:
        json.dump(result, file, indent=2, allow_nan=False)
    print(f"\nwrote {path}" + (" (replaced the existing file)" if replaced else ""))


def main(argv=None):
    """Command line: `compare RUN_A RUN_B` or `summary RUN...` (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Compare runs or summarise seeds of tumor-vlm.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="two runs on the same images: bootstrap CIs, "
                                  "paired accuracy difference and McNemar's test")
    compare.add_argument("run_a", help="run folder A (with predictions.csv)")
    compare.add_argument("run_b", help="run folder B (with predictions.csv), same test images")
    compare.add_argument("--json", help="output JSON (default: RUN_A/compare_<name of RUN_B>.json)")
    compare.add_argument("--ci-method", default=CI_METHOD, choices=("BCa", "percentile"),
                         help=f"bootstrap interval method (default {CI_METHOD})")
    compare.add_argument("--n-resamples", type=int, default=N_RESAMPLES,
                         help=f"bootstrap resamples per interval (default {N_RESAMPLES})")
    compare.add_argument("--seed", type=int, default=SEED,
                         help=f"seed of the bootstrap resampling (default {SEED})")
    summary = commands.add_parser("summary", help="mean +- sample std of test metrics over runs")
    summary.add_argument("runs", nargs="+",
                         help="run folders (with metrics.json), e.g. one per seed")
    summary.add_argument("--json", help="output JSON (default: summary.json in the runs' common "
                         "parent folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            result = compare_runs(args.run_a, args.run_b, args.ci_method, args.n_resamples,
                                  args.seed)
            text = format_comparison(result)
            run_b_name = os.path.basename(os.path.normpath(args.run_b))
            json_path = args.json or os.path.join(args.run_a, f"compare_{run_b_name}.json")
        else:
            result = summarize_runs(args.runs)
            text = format_summary(result)
            parents = [os.path.dirname(os.path.abspath(run)) for run in args.runs]
            json_path = args.json or os.path.join(os.path.commonpath(parents), "summary.json")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"stats.py {args.command}: {error}")
    print(text)
    _write_json(result, json_path)
    return result


if __name__ == "__main__":
    main()
