"""Tests for stats.py, each against an independent oracle or a worked example:

- every metric against scikit-learn (used only here) on 5 random seeds with tied scores and a
  class never predicted, to 1e-10; macro means over the classes present in y_true (sklearn's
  labels=); AUC 3.5/4, AP 1/2 + 1/3 and ECE 0.3625 on hand-computed cases;
- McNemar against published numbers (Agresti's presidential approval 17.36 / 16.82, Wikipedia
  21.35, calcugator.com exact p 0.057373046875, stat-tools.xyz 2.1176 / 0.1456 / 0.1435);
- bootstrap: coverage of 95 % percentile and BCa intervals on 200 simulated test sets, BCa of a
  skewed mean against a textbook BCa (Efron & Tibshirani 1993), macro-F1 and paired-difference
  intervals identical to scipy with sklearn / per-image statistics;
- calibration: a known temperature is recovered, the validation NLL is at least as low as a
  brute-force temperature scan's, the tumour threshold matches a brute-force F1 scan;
- the run folder (strict JSON, predictions.csv read back, report, figures) and the compare /
  summary command lines end to end on fake run folders; their outputs are never replaced
  without --overwrite, runs on other test images (or one run twice) are refused.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_stats.py (about 10 s)
"""
import csv
import json
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as sk

import stats

SEEDS = (0, 1, 2, 3, 4)
N_CLASSES = 4
NAMES = ("glioma", "meningioma", "notumor", "pituitary")


def random_labels(seed, n=300):
    """(y_true, y_pred, probs) with ~80 % accuracy; odd seeds never predict class 3, and
    seeds 3-4 round the probabilities to 1 decimal so that many scores tie."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, N_CLASSES, n)
    probs = rng.dirichlet(np.ones(N_CLASSES), n)
    probs[np.arange(n), y_true] += rng.random(n)  # informative but imperfect scores
    probs /= probs.sum(axis=1, keepdims=True)
    if seed >= 3:
        probs = np.round(probs, 1)
    y_pred = np.where(rng.random(n) < 0.8, y_true, rng.integers(0, N_CLASSES, n))
    if seed % 2:
        y_pred[y_pred == 3] = 0  # class 3 absent from y_pred
    return y_true, y_pred, probs


# ----------------------------------------------------------------------------------------------
# Metrics against scikit-learn

@pytest.mark.parametrize("seed", SEEDS)
def test_hard_prediction_metrics_match_sklearn(seed):
    y_true, y_pred, _ = random_labels(seed)
    labels = list(range(N_CLASSES))
    assert stats.accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred),
                                                           abs=1e-12)
    np.testing.assert_array_equal(stats.confusion_matrix(y_true, y_pred, N_CLASSES),
                                  sk.confusion_matrix(y_true, y_pred, labels=labels))
    precision, recall, f1, support = stats.precision_recall_f1(y_true, y_pred, N_CLASSES)
    expected = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for ours, theirs in zip((precision, recall, f1, support), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    per_class = stats.metrics_dict(y_true, y_pred, None, NAMES)["per_class"].values()
    sensitivity = [scores["sensitivity"] for scores in per_class]
    specificity = [scores["specificity"] for scores in per_class]
    one_vs_rest = sk.multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # (C, 2, 2)
    (tn, fp), (fn, tp) = np.moveaxis(one_vs_rest, 0, -1)
    np.testing.assert_allclose(sensitivity, tp / (tp + fn), atol=1e-10)
    np.testing.assert_allclose(specificity, tn / (tn + fp), atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_and_average_precision_match_sklearn_with_ties(seed):
    y_true, _, probs = random_labels(seed)
    roc_auc, macro_roc_auc = stats.roc_auc_ovr(y_true, probs)
    pr_auc, macro_pr_auc = stats.average_precision(y_true, probs)
    for c in range(N_CLASSES):
        is_positive = y_true == c
        scores = probs[:, c]
        assert roc_auc[c] == pytest.approx(sk.roc_auc_score(is_positive, scores), abs=1e-10)
        assert pr_auc[c] == pytest.approx(sk.average_precision_score(is_positive, scores),
                                          abs=1e-10)
    one_hot = np.eye(N_CLASSES)[y_true]
    assert macro_pr_auc == pytest.approx(sk.average_precision_score(one_hot, probs), abs=1e-10)
    if seed < 3:  # sklearn's multi-class AUC insists on rows summing to 1 (rounding breaks that)
        assert macro_roc_auc == pytest.approx(
            sk.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"), abs=1e-10)


def test_auc_worked_example_with_tie():
    """Positives score 0.9, 0.5; negatives 0.5, 0.1. Of the 4 positive/negative pairs, 3 are
    ordered correctly and one is tied (half credit): AUC = 3.5 / 4. AP: at threshold 0.9
    precision 1 (recall 1/2), at 0.5 precision 2/3 (recall 1): AP = 1/2 + 1/3."""
    y_true = np.array([0, 0, 1, 1])
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    probs = np.stack([scores, 1 - scores], axis=1)
    roc_auc, _ = stats.roc_auc_ovr(y_true, probs)
    pr_auc, _ = stats.average_precision(y_true, probs)
    assert roc_auc[0] == pytest.approx(3.5 / 4, abs=1e-12)
    assert pr_auc[0] == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_class_absent_from_y_true_gives_nan_auc_skipped_by_macro():
    y_true, _, probs = random_labels(0)
    y_true[y_true == 2] = 1
    roc_auc, macro_roc_auc = stats.roc_auc_ovr(y_true, probs)
    pr_auc, macro_pr_auc = stats.average_precision(y_true, probs)
    assert np.isnan(roc_auc[2]) and np.isnan(pr_auc[2])
    assert macro_roc_auc == pytest.approx(np.mean(roc_auc[[0, 1, 3]]), abs=1e-12)
    assert macro_pr_auc == pytest.approx(np.mean(pr_auc[[0, 1, 3]]), abs=1e-12)
    only_glioma = np.zeros(10, dtype=int)  # no negative image: no pair for ROC, AP is 1
    roc_auc, macro_roc_auc = stats.roc_auc_ovr(only_glioma, probs[:10])
    assert np.isnan(roc_auc).all() and np.isnan(macro_roc_auc)
    expected = sk.average_precision_score(np.ones(10), probs[:10, 0])
    assert stats.average_precision(only_glioma, probs[:10])[0][0] == pytest.approx(expected)


@pytest.mark.parametrize("seed", SEEDS[:3])  # continuous probabilities: no ties
def test_top_k_accuracy_matches_sklearn(seed):
    y_true, _, probs = random_labels(seed)
    for k in (1, 2, 3):
        assert stats.top_k_accuracy(y_true, probs, k) == pytest.approx(
            sk.top_k_accuracy_score(y_true, probs, k=k, labels=range(N_CLASSES)), abs=1e-12)


def test_top_k_accuracy_ties_count_as_hits():
    probs = np.array([[0.4, 0.4, 0.2], [0.5, 0.3, 0.2]])
    assert stats.top_k_accuracy(np.array([1, 2]), probs, k=1) == 0.5  # row 0 tied for first
    assert stats.top_k_accuracy(np.array([1, 2]), probs, k=2) == 0.5


def test_expected_calibration_error_worked_example():
    """Confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.7 (right) fall in bins 13, 13, 9
    and 10 of 15: ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.65| + 1/4 |1 - 0.7| = 0.3625."""
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.3, 0.7]])
    y_true = np.array([0, 1, 0, 1])
    assert stats.expected_calibration_error(y_true, probs) == pytest.approx(0.3625, abs=1e-12)
    mean_confidence, bin_accuracy, count = stats.calibration_bins(y_true, probs)
    assert count[[9, 10, 13]].tolist() == [1, 1, 2] and count.sum() == 4
    assert bin_accuracy[13] == 0.5 and mean_confidence[13] == pytest.approx(0.9)


@pytest.mark.parametrize("seed", SEEDS)
def test_expected_calibration_error_matches_loop_over_bins(seed):
    """Independent form: a Python loop over the bins (lower, upper] as in Guo et al. (2017)."""
    y_true, _, probs = random_labels(seed)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    expected = 0.0
    for lower, upper in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            expected += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    assert stats.expected_calibration_error(y_true, probs) == pytest.approx(expected, abs=1e-10)


def test_metrics_dict_is_json_and_matches_sklearn():
    y_true, y_pred, probs = random_labels(1)  # class 3 never predicted
    names = NAMES
    metrics = stats.metrics_dict(y_true, y_pred, probs, names)
    metrics = json.loads(json.dumps(metrics, allow_nan=False))  # strict JSON round trip
    averaging = {"labels": list(range(N_CLASSES)), "zero_division": 0}
    assert metrics["n"] == len(y_true)
    assert metrics["macro_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, average="macro", **averaging))
    assert metrics["weighted_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, average="weighted", **averaging))
    assert metrics["macro_precision"] == pytest.approx(
        sk.precision_score(y_true, y_pred, average="macro", **averaging))
    assert metrics["per_class"]["pituitary"]["precision"] == 0.0
    assert metrics["top2_accuracy"] == pytest.approx(sk.top_k_accuracy_score(y_true, probs, k=2))
    assert metrics["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred).tolist()
    assert {"macro_roc_auc", "macro_pr_auc", "ece"} <= set(metrics)
    without_probs = stats.metrics_dict(y_true, y_pred, None, names)
    assert not {"top2_accuracy", "macro_roc_auc", "macro_pr_auc", "ece"} & set(without_probs)
    assert "roc_auc" not in without_probs["per_class"]["glioma"]


def test_macro_means_skip_a_class_absent_from_y_true():
    """Issue 11: perfect predictions with no notumor image give macro-F1 1.0 (not 0.75), as
    sklearn with labels = the present classes; the same on imperfect random predictions."""
    y_true = np.array([0, 0, 1, 1, 1, 3, 3])
    perfect = stats.metrics_dict(y_true, y_true, np.eye(4)[y_true], NAMES)
    present = [0, 1, 3]
    assert perfect["macro_f1"] == 1.0 == sk.f1_score(y_true, y_true, labels=present,
                                                     average="macro")
    assert perfect["macro_precision"] == perfect["macro_recall"] == 1.0
    assert perfect["macro_roc_auc"] == 1.0 and perfect["per_class"]["notumor"]["roc_auc"] is None
    y_true, y_pred, probs = random_labels(0)
    y_true[y_true == 2] = 1
    metrics = stats.metrics_dict(y_true, y_pred, probs, NAMES)  # class 2 still predicted
    for key, score in (("macro_f1", sk.f1_score), ("macro_precision", sk.precision_score),
                       ("macro_recall", sk.recall_score)):
        expected = score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        assert metrics[key] == pytest.approx(expected, abs=1e-12)
        wrong = score(y_true, y_pred, labels=range(4), average="macro", zero_division=0)
        assert abs(metrics[key] - wrong) > 1e-3  # the test can tell the two definitions apart
    report = stats.classification_report(y_true, y_pred, NAMES).splitlines()
    expected = sk.classification_report(y_true, y_pred, labels=present, output_dict=True,
                                        zero_division=0)["macro avg"]
    assert report[6].split()[2:5] == [f"{expected[m]:.2f}" for m in
                                      ("precision", "recall", "f1-score")]
    assert "notumor" in report[8]
    assert stats.macro_f1_ci(np.array([0, 1, 3] * 20), np.array([0, 1, 3] * 20), 4) == (1.0, 1.0)


def test_classification_report_numbers_match_sklearn():
    y_true, y_pred, _ = random_labels(2)
    report = stats.classification_report(y_true, y_pred, NAMES).splitlines()
    expected = sk.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert report[0].split() == ["Class", "Precision", "Recall", "F1-score", "Support"]
    def two_decimals(row):
        return [f"{row[m]:.2f}" for m in ("precision", "recall", "f1-score")]

    for line, key in zip(report[1:5], ["0", "1", "2", "3"]):
        support = str(int(expected[key]["support"]))
        assert line.split()[1:] == two_decimals(expected[key]) + [support]
    assert report[5].split()[-2] == f"{expected['accuracy']:.2f}"
    assert report[6].split()[2:5] == two_decimals(expected["macro avg"])
    assert report[7].split()[2:5] == two_decimals(expected["weighted avg"])


# ----------------------------------------------------------------------------------------------
# McNemar against published worked examples

def paired_correctness(both_correct, only_a, only_b, both_wrong):
    """Per-image correctness of classifiers A and B that reproduce the given 2x2 table."""
    correct_a = [True] * both_correct + [True] * only_a + [False] * only_b + [False] * both_wrong
    correct_b = [True] * both_correct + [False] * only_a + [True] * only_b + [False] * both_wrong
    return np.array(correct_a), np.array(correct_b)


def table_counts(result):
    """The 2x2 table of a mcnemar() result: (both correct, only A, only B, both wrong)."""
    return tuple(result[key] for key in ("both_correct", "only_a_correct", "only_b_correct",
                                         "both_wrong"))


def test_mcnemar_agresti_presidential_approval():
    """Agresti, Categorical Data Analysis (2nd ed., Sec. 10.1), approval of the President in two
    surveys of the same 1600 people: 794 approve/approve, 150 approve/disapprove, 86
    disapprove/approve, 570 disapprove/disapprove. Published: z^2 = 17.36 without continuity
    correction (P < 0.0001); (|150 - 86| - 1)^2 / 236 = 16.82 with it."""
    result = stats.mcnemar(*paired_correctness(794, 150, 86, 570), continuity_correction=False)
    assert table_counts(result) == (794, 150, 86, 570)
    assert round(result["mcnemar_chi2"], 2) == 17.36 and result["mcnemar_chi2_p"] < 1e-4
    corrected = stats.mcnemar(*paired_correctness(794, 150, 86, 570))
    assert round(corrected["mcnemar_chi2"], 2) == 16.82 and corrected["mcnemar_exact_p"] < 1e-4


def test_mcnemar_wikipedia_example():
    """Wikipedia, "McNemar's test", first example: 314 patients, b = 121, c = 59 (a = 101,
    d = 33); published statistic (b - c)^2 / (b + c) = 21.35 (no continuity correction;
    3844 / 180 = 21.3556, so the page truncates rather than rounds)."""
    result = stats.mcnemar(*paired_correctness(101, 121, 59, 33), continuity_correction=False)
    assert result["mcnemar_chi2"] == pytest.approx(21.35, abs=0.01)
    assert result["mcnemar_chi2"] == pytest.approx(3844 / 180, rel=1e-12)


def test_mcnemar_small_tables_exact_and_corrected():
    """Two calculator worked examples with published digits.
    calcugator.com chi2_mcnemar: death-penalty opinions of 20 teenagers, b = 11, c = 3;
    two-tailed exact probability 0.057373046875 (= 2 * 470 / 2^14).
    stat-tools.xyz McNemar: b = 12, c = 5; chi-square (cc) 2.1176, p 0.1456, exact p 0.1435."""
    teenagers = stats.mcnemar(*paired_correctness(1, 11, 3, 5))
    assert teenagers["mcnemar_exact_p"] == pytest.approx(0.057373046875, abs=1e-12)
    calculator = stats.mcnemar(*paired_correctness(0, 12, 5, 0))
    assert round(calculator["mcnemar_chi2"], 4) == 2.1176
    assert round(calculator["mcnemar_chi2_p"], 4) == 0.1456
    assert round(calculator["mcnemar_exact_p"], 4) == 0.1435


def test_mcnemar_exact_p_matches_doubled_binomial_tail():
    rng = np.random.default_rng(0)
    discordant_counts = [(0, 0), (0, 1), (5, 5), (30, 2)]
    discordant_counts += [rng.integers(0, 40, 2) for _ in range(20)]
    for only_a, only_b in discordant_counts:
        result = stats.mcnemar(*paired_correctness(10, only_a, only_b, 3))
        n = only_a + only_b
        smaller_tail = scipy_stats.binom.cdf(min(only_a, only_b), n, 0.5)
        expected = 1.0 if n == 0 else min(1.0, 2 * smaller_tail)
        assert result["mcnemar_exact_p"] == pytest.approx(expected, rel=1e-10, abs=1e-15)
    never_disagree = stats.mcnemar(*paired_correctness(10, 0, 0, 3))
    assert never_disagree["mcnemar_chi2_p"] == 1.0 and never_disagree["mcnemar_chi2"] == 0.0


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals

def test_bootstrap_coverage_on_simulated_accuracy():
    """200 simulated test sets of n=300 images with true accuracy 0.9: a 95 % interval should
    contain 0.9 in about 95 % of them (0.90-0.99 allows for the 200-set Monte Carlo error)."""
    rng = np.random.default_rng(2024)
    covered = {"percentile": 0, "BCa": 0}
    for dataset in range(200):
        correct = rng.random(300) < 0.9
        for method in covered:
            low, high = stats.accuracy_ci(correct, method=method, seed=dataset)
            covered[method] += low <= 0.9 <= high
    for method, count in covered.items():
        assert 0.90 <= count / 200 <= 0.99, f"{method} covered {count}/200"


def textbook_bca(values, n_resamples, seed, confidence_level=0.95):
    """BCa interval of the mean, Efron & Tibshirani (1993) eq. 14.9-14.15, written out."""
    rng = np.random.default_rng(seed)
    n = len(values)
    boot_means = values[rng.integers(0, n, (n_resamples, n))].mean(axis=1)
    bias_z0 = scipy_stats.norm.ppf(np.mean(boot_means < values.mean()))
    jackknife_means = (values.sum() - values) / (n - 1)
    deviations = jackknife_means.mean() - jackknife_means
    acceleration = np.sum(deviations ** 3) / (6 * np.sum(deviations ** 2) ** 1.5)
    z = scipy_stats.norm.ppf([(1 - confidence_level) / 2, (1 + confidence_level) / 2])
    adjusted = scipy_stats.norm.cdf(bias_z0 + (bias_z0 + z) / (1 - acceleration * (bias_z0 + z)))
    return np.quantile(boot_means, adjusted)


def test_bca_of_a_skewed_mean_matches_textbook_bca():
    """Exponential data (skewed): BCa moves the interval right of the percentile one; ours must
    equal an independent textbook BCa up to Monte Carlo error (20000 resamples each)."""
    values = np.random.default_rng(1).exponential(size=50)
    ours = stats.bootstrap_ci((values,), np.mean, method="BCa", n_resamples=20000, seed=3)
    reference = textbook_bca(values, 20000, seed=7)
    np.testing.assert_allclose(ours, reference, atol=0.025)
    percentile = stats.bootstrap_ci((values,), np.mean, method="percentile",
                                    n_resamples=20000, seed=3)
    assert reference[0] - percentile[0] > 0.04  # the check above can tell the two methods apart


def test_macro_f1_ci_equals_scipy_with_sklearn_statistic():
    """Same seed -> same resampled indices, so our bincount statistic must give the interval
    that scipy gets from sklearn's f1_score called once per resample, averaged over the
    classes present in that resample (class 2 has 2 images: ~13 % of resamples miss it)."""
    y_true, y_pred, _ = random_labels(1, n=120)
    y_true[np.flatnonzero(y_true == 2)[2:]] = 0

    def sklearn_macro_f1(true_resample, pred_resample):
        return sk.f1_score(true_resample, pred_resample, labels=np.unique(true_resample),
                           average="macro", zero_division=0)

    for method in ("percentile", "BCa"):
        ours = stats.macro_f1_ci(y_true, y_pred, N_CLASSES, method=method, n_resamples=300, seed=5)
        reference = scipy_stats.bootstrap(
            (y_true, y_pred), sklearn_macro_f1, paired=True, vectorized=False, n_resamples=300,
            method=method, rng=np.random.default_rng(5))
        np.testing.assert_allclose(ours, reference.confidence_interval, atol=1e-10)


def test_accuracy_difference_ci_is_bootstrap_of_paired_differences():
    rng = np.random.default_rng(3)
    correct_a, correct_b = rng.random(250) < 0.9, rng.random(250) < 0.8
    ours = stats.accuracy_difference_ci(correct_a, correct_b, seed=11)
    differences = correct_a.astype(float) - correct_b  # one paired difference per image
    reference = scipy_stats.bootstrap((differences,), np.mean, n_resamples=2000,
                                      rng=np.random.default_rng(11))
    np.testing.assert_allclose(ours, reference.confidence_interval, atol=1e-12)
    assert ours[0] < correct_a.mean() - correct_b.mean() < ours[1]


def test_constant_data_gives_a_point_interval():
    assert stats.accuracy_ci(np.ones(50, dtype=bool)) == (1.0, 1.0)
    labels = np.arange(200) % N_CLASSES
    assert stats.macro_f1_ci(labels, labels, N_CLASSES) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Run folders and the command line

def write_run(run_dir, paths, y_true, y_pred, probs, seed=0):
    """A fake run folder: predictions.csv and metrics.json as the training scripts write them."""
    os.makedirs(run_dir, exist_ok=True)
    names = NAMES
    with open(os.path.join(run_dir, "predictions.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "pred"] + [f"p_{name}" for name in names])
        for path, label, pred, row in zip(paths, y_true, y_pred, probs):
            writer.writerow([path, names[label], names[pred]] + [f"{p:.6f}" for p in row])
    test_metrics = stats.metrics_dict(y_true, y_pred, probs, names)
    metrics = {"model": "fake", "seed": seed, "test": test_metrics}
    with open(os.path.join(run_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file)


def image_paths(y_true):
    """Dataset-relative image paths like the real test split's, one per label."""
    return [f"Testing/{NAMES[c]}/Te-{i:04d}.jpg" for i, c in enumerate(y_true)]


def fake_pair(tmp_path, n=200):
    """Runs A and B on the same n images: A right on 180, B on 166; B's rows are shuffled."""
    rng = np.random.default_rng(0)
    y_true = np.arange(n) % 4
    paths = image_paths(y_true)
    correct_a = np.arange(n) < 180
    correct_b = (np.arange(n) < 160) | (np.arange(n) >= 194)  # 160 both, 20 only A, 6 only B
    pred_a = np.where(correct_a, y_true, (y_true + 1) % 4)
    pred_b = np.where(correct_b, y_true, (y_true + 2) % 4)
    probs_a, probs_b = np.eye(4)[pred_a] * 0.7 + 0.075, np.eye(4)[pred_b] * 0.6 + 0.1
    order = rng.permutation(n)
    write_run(tmp_path / "run_a", paths, y_true, pred_a, probs_a)
    write_run(tmp_path / "run_b", [paths[i] for i in order], y_true[order], pred_b[order],
              probs_b[order])
    return y_true, pred_a, pred_b


def test_read_predictions_round_trip_and_missing_column(tmp_path):
    y_true, pred_a, _ = fake_pair(tmp_path)
    read = stats.read_predictions(tmp_path / "run_a" / "predictions.csv")
    paths, labels, preds, probs, class_names = read
    assert class_names == NAMES and len(paths) == 200
    np.testing.assert_array_equal(labels, y_true)
    np.testing.assert_array_equal(preds, pred_a)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    broken = tmp_path / "broken.csv"
    broken.write_text("path,label,p_glioma\nx.jpg,glioma,1.0\n")
    with pytest.raises(SystemExit, match=r"broken\.csv: missing column\(s\) \['pred'\]"):
        stats.read_predictions(broken)


def test_compare_cli_matches_independent_computation(tmp_path, capsys):
    y_true, pred_a, pred_b = fake_pair(tmp_path)
    out = tmp_path / "cmp.json"
    stats.main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "accuracy A - B (CI): 0.0700 (" in printed and str(out) in printed
    assert "| accuracy (CI) | 0.9000 (" in printed and "| F1 glioma | " in printed
    result = json.loads(out.read_text())
    assert result["a"]["accuracy"] == pytest.approx(sk.accuracy_score(y_true, pred_a))
    assert result["b"]["accuracy"] == pytest.approx(sk.accuracy_score(y_true, pred_b))
    assert result["b"]["macro_f1"] == pytest.approx(sk.f1_score(y_true, pred_b, average="macro"))
    glioma_f1_b = sk.f1_score(y_true, pred_b, average=None)[0]
    assert result["b"]["per_class_f1"]["glioma"] == pytest.approx(glioma_f1_b)
    assert table_counts(result) == (160, 20, 6, 14)
    exact_p = scipy_stats.binomtest(20, 26, 0.5).pvalue
    assert result["mcnemar_exact_p"] == pytest.approx(exact_p, rel=1e-12)
    assert result["mcnemar_chi2"] == pytest.approx((14 - 1) ** 2 / 26)
    assert result["mcnemar_chi2_p"] == pytest.approx(scipy_stats.chi2.sf((14 - 1) ** 2 / 26, 1))
    assert result["accuracy_difference"] == pytest.approx(0.07)
    low, high = result["accuracy_difference_ci"]
    assert low < 0.07 < high and result["a"]["accuracy_ci"][0] < 0.9 < result["a"]["accuracy_ci"][1]
    stats.main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"),
                "--n-resamples", "500"])
    assert (tmp_path / "run_a" / "compare_run_b.json").exists()  # default output path


def test_compare_cli_rejects_different_image_sets(tmp_path):
    y_true, pred_a, _ = fake_pair(tmp_path)
    paths = image_paths(y_true)
    paths[0] = "Testing/glioma/extra.jpg"
    write_run(tmp_path / "run_c", paths, y_true, pred_a, np.eye(4)[pred_a])
    with pytest.raises(SystemExit, match=r"different images: 1 path\(s\) only in A "
                       r"\(e\.g\. \['Testing/glioma/Te-0000\.jpg'\]\), 1 only in B "
                       r"\(e\.g\. \['Testing/glioma/extra\.jpg'\]\)"):
        stats.main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_c")])


def test_summary_cli_is_mean_and_sample_std(tmp_path):
    rng = np.random.default_rng(0)
    runs, accuracies, glioma_f1 = [], [], []
    y_true = rng.integers(0, 4, 100)  # seeds of one study: one test set
    for seed in range(3):
        y_pred = np.where(rng.random(100) < 0.85, y_true, rng.integers(0, 4, 100))
        probs = rng.dirichlet(np.ones(4), 100)
        run_dir = tmp_path / "runs" / f"seed{seed}"
        write_run(run_dir, image_paths(y_true), y_true, y_pred, probs, seed)
        runs.append(str(run_dir))
        accuracies.append(sk.accuracy_score(y_true, y_pred))
        glioma_f1.append(sk.f1_score(y_true, y_pred, average=None)[0])
    stats.main(["summary", *runs, "--out", str(tmp_path / "summary.json")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_runs"] == 3
    metrics = summary["metrics"]
    assert metrics["accuracy"]["mean"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert metrics["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    assert metrics["f1_glioma"]["mean"] == pytest.approx(np.mean(glioma_f1), abs=1e-12)
    assert metrics["f1_glioma"]["std"] == pytest.approx(np.std(glioma_f1, ddof=1), abs=1e-12)
    assert "ece" in metrics and "per_class" not in metrics
    assert stats.summarize_runs(runs[:1])["metrics"]["accuracy"]["std"] is None


def test_outputs_are_not_replaced_and_mixed_runs_are_refused(tmp_path, capsys):
    """Issue 22: summary writes only where --out says and, like compare, replaces an existing
    output only with --overwrite; runs on other test images, or one run twice, are refused; a
    truncated predictions.csv is named (no traceback)."""
    y_true, pred_a, _ = fake_pair(tmp_path)
    runs = [str(tmp_path / "run_a"), str(tmp_path / "run_b")]
    stats.main(["summary", *runs])
    assert not (tmp_path / "summary.json").exists()  # printed only
    mine = tmp_path / "summary.json"
    mine.write_text("mine")
    for command in (["summary", *runs, "--out", str(mine)], ["compare", *runs, "--out", str(mine)]):
        with pytest.raises(SystemExit, match="summary.json: exists; pass --overwrite"):
            stats.main(command)
    assert mine.read_text() == "mine"
    with pytest.raises(SystemExit, match="--out .*: is a folder"):
        stats.main(["summary", *runs, "--out", str(tmp_path)])
    stats.main(["summary", *runs, "--out", str(mine), "--overwrite"])
    assert json.loads(mine.read_text())["n_runs"] == 2
    stats.main(["compare", *runs, "--n-resamples", "50"])
    with pytest.raises(SystemExit, match="compare_run_b.json: exists; pass --overwrite"):
        stats.main(["compare", *runs, "--n-resamples", "50"])
    with pytest.raises(SystemExit, match="run_a/? are one run"):
        stats.main(["summary", runs[0], runs[0] + "/"])
    paths = image_paths(y_true)
    paths[0] = "Testing/glioma/extra.jpg"
    write_run(tmp_path / "run_c", paths, y_true, pred_a, np.eye(4)[pred_a])
    with pytest.raises(SystemExit, match="run_a and .*run_c were evaluated on different images"):
        stats.main(["summary", *runs, str(tmp_path / "run_c")])
    predictions = tmp_path / "run_c" / "predictions.csv"
    predictions.write_text(predictions.read_text()[:500])  # cut inside a row
    with pytest.raises(SystemExit, match="run_c/predictions.csv: bad label or probability, or a "
                                         "short row"):
        stats.main(["compare", runs[0], str(tmp_path / "run_c")])


def test_write_run_folder_files_read_back(tmp_path):
    from matplotlib.image import imread
    y_true, _, probs = random_labels(0, n=80)
    paths = image_paths(y_true)
    metrics = {"seed": 7, "test": stats.metrics_dict(y_true, probs.argmax(1), probs, NAMES),
               "loss": float("nan"), "ratio": np.float32(np.inf), "counts": np.arange(3)}
    history = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5, "select_loss": 1.0,
                "select_accuracy": 0.4} for e in (1, 2)]
    for out, epochs in ((tmp_path / "trained", history), (tmp_path / "zero_shot", [])):
        out.mkdir()
        stats.write_run_folder(out, metrics, epochs, paths, y_true, probs, NAMES, "demo, seed 7\n")
    out = tmp_path / "trained"
    strict = json.loads((out / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert strict["loss"] is None and strict["ratio"] is None and strict["counts"] == [0, 1, 2]
    assert strict["test"]["accuracy"] == pytest.approx(sk.accuracy_score(y_true, probs.argmax(1)))
    read_paths, labels, preds, read_probs, class_names = stats.read_predictions(
        out / "predictions.csv")
    assert read_paths == paths and class_names == NAMES
    np.testing.assert_array_equal(labels, y_true)
    np.testing.assert_array_equal(preds, probs.argmax(1))
    np.testing.assert_allclose(read_probs, probs, atol=5e-7)
    report = (out / "report.txt").read_text()
    assert report.startswith("demo, seed 7\n\nClass") and "Weighted Avg" in report
    for name in ("confusion_matrix.png", "reliability.png", "curves.png"):
        assert imread(out / name).ndim == 3  # (H, W, RGBA)
    assert not (tmp_path / "zero_shot" / "curves.png").exists()
    assert (tmp_path / "zero_shot" / "reliability.png").exists()
    assert sorted(os.listdir(tmp_path / "zero_shot")) == sorted(
        ["metrics.json", "predictions.csv", "report.txt", "confusion_matrix.png",
         "reliability.png"])  # and no temporary file left behind


def test_write_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "out.json"
    stats.write_json({"nan": np.nan, "values": (np.float64(-np.inf), np.int64(3), True)}, path)
    assert json.loads(path.read_text()) == {"nan": None, "values": [None, 3, True]}
    with pytest.raises(TypeError):
        stats.write_json({"not json": object()}, path)
    assert json.loads(path.read_text())["nan"] is None  # the old file is kept whole
    assert os.listdir(tmp_path) == ["out.json"]          # and the temporary file removed


# ----------------------------------------------------------------------------------------------
# Calibration

def sample_labels(rng, probs):
    """One label per row drawn from the row's class probabilities."""
    return (rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_fit_recovers_a_known_temperature(seed):
    """Labels drawn from softmax(z / 2.5): fitting on z must give T = 2.5 within 10 % and
    offsets near 0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (3000, 4))
    temperature, offsets = stats.fit_temperature_and_offsets(
        logits, sample_labels(rng, softmax(logits / 2.5)))
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert np.all(np.abs(offsets) < 0.15) and abs(offsets.sum()) < 1e-9


def random_calibration_case(seed, n=200):
    """Logits of 4 classes whose labels follow softmax(z / T_true + b_true), plus one
    uninformative case (labels independent of z)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, rng.uniform(0.5, 5), (2 * n, 4))
    true_offsets = rng.normal(0, 1, 4)
    labels = sample_labels(rng, softmax(logits / rng.uniform(0.3, 3) + true_offsets))
    if seed % 4 == 3:
        labels = rng.integers(0, 4, 2 * n)
    return logits[:n], labels[:n], logits[n:], labels[n:]


@pytest.mark.parametrize("seed", range(8))
def test_calibration_fits_at_least_as_well_as_a_temperature_scan(seed):
    val_logits, val_y, test_logits, test_y = random_calibration_case(seed)
    result = stats.calibrate(val_logits, val_y, test_logits, test_y, NAMES)
    assert result["val_nll_before"] == pytest.approx(
        sk.log_loss(val_y, softmax(val_logits), labels=range(4)), abs=1e-9)
    # temperature and offsets together must fit at least as well as the best temperature alone
    scan = [-np.mean(np.log(softmax(val_logits / t)[np.arange(len(val_y)), val_y]))
            for t in np.geomspace(0.05, 20, 400)]
    assert result["val_nll_after"] <= min(scan) + 1e-6
    offsets = np.array(list(result["offsets"].values()))
    test_probs = softmax(test_logits / result["temperature"] + offsets)
    np.testing.assert_allclose(result["test_probs"], test_probs, atol=1e-12)
    assert result["test_nll_after"] == pytest.approx(
        sk.log_loss(test_y, test_probs, labels=range(4)), abs=1e-9)
    assert result["test_ece_after"] == pytest.approx(
        stats.expected_calibration_error(test_y, test_probs), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_maximises_validation_tumour_f1(seed):
    """Brute force: sklearn's F1 of the call 'P(tumour) >= t' over a fine grid of t never beats
    the chosen threshold; the test F1 before (the model's argmax) and after match sklearn."""
    val_logits, val_y, test_logits, test_y = random_calibration_case(seed)
    result = stats.calibrate(val_logits, val_y, test_logits, test_y, NAMES)
    offsets = np.array(list(result["offsets"].values()))
    val_tumour = 1 - softmax(val_logits / result["temperature"] + offsets)[:, 2]
    def val_f1(threshold):  # harmonic mean of precision and recall, 0 when undefined
        called = val_tumour >= threshold
        true_pos = np.sum(called & (val_y != 2))
        if true_pos == 0:
            return 0.0
        precision, recall = true_pos / called.sum(), true_pos / np.sum(val_y != 2)
        return 2 * precision * recall / (precision + recall)
    best = val_f1(result["threshold"])
    assert best == pytest.approx(sk.f1_score(val_y != 2, val_tumour >= result["threshold"]))
    assert max(val_f1(t) for t in np.r_[np.linspace(0, 1, 1001), val_tumour]) <= best + 1e-12
    assert result["test_tumour_f1_before"] == pytest.approx(
        sk.f1_score(test_y != 2, test_logits.argmax(1) != 2, zero_division=0), abs=1e-12)
    assert result["test_tumour_f1_after"] == pytest.approx(sk.f1_score(
        test_y != 2, 1 - result["test_probs"][:, 2] >= result["threshold"], zero_division=0))
    with pytest.raises(SystemExit, match="'healthy' is not one of"):
        stats.calibrate(val_logits, val_y, test_logits, test_y, NAMES, negative_class="healthy")


def test_reliability_diagram_before_and_after(tmp_path):
    from matplotlib.image import imread
    val_logits, val_y, test_logits, test_y = random_calibration_case(0)
    result = stats.calibrate(val_logits, val_y, test_logits, test_y, NAMES)
    stats.plot_reliability(test_y, softmax(test_logits), result["test_probs"], tmp_path / "r.png")
    assert imread(tmp_path / "r.png").ndim == 3
