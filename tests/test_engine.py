"""engine.py pieces not covered through the scripts: losses and class weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_matches_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(12, 4), torch.randint(0, 4, (12,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert torch.allclose(engine.focal_loss(logits, targets, gamma=0.0),
                          F.cross_entropy(logits, targets), atol=1e-6)
    assert torch.allclose(engine.focal_loss(logits, targets, weight, gamma=0.0),
                          F.cross_entropy(logits, targets, weight=weight), atol=1e-6)
    # gamma = 2, written out per sample: -(1 - p_t)^2 log p_t, weighted mean
    p = logits.softmax(-1)[torch.arange(12), targets].double()
    w = weight[targets].double()
    expected = (w * -(1 - p) ** 2 * p.log()).sum() / w.sum()
    assert engine.focal_loss(logits, targets, weight).item() == pytest.approx(expected.item(),
                                                                              rel=1e-5)


def test_hybrid_loss_is_the_mean_of_ce_and_focal():
    logits, targets = torch.randn(8, 4), torch.randint(0, 4, (8,))
    hybrid = engine.make_loss("hybrid", None)(logits, targets)
    expected = 0.5 * (F.cross_entropy(logits, targets) + engine.focal_loss(logits, targets))
    assert torch.allclose(hybrid, expected)


def test_balanced_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.array([0] * 10 + [1] * 30 + [2] * 5 + [3] * 55)
    ours = engine.balanced_class_weights(labels, 4).numpy()
    theirs = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    assert np.allclose(ours, theirs)


def test_out_of_range_options_are_named_in_one_error(tiny_clip_config, synth_dir):
    import clip_tumor
    with pytest.raises(SystemExit, match=r"--views 0: at least 1.*--val-fraction 1.5"):
        clip_tumor.main(["--data", synth_dir, "--model", tiny_clip_config, "--pretrained", "none",
                         "--views", "0", "--val-fraction", "1.5"])
    with pytest.raises(SystemExit, match="--split nope.csv: no such file"):
        clip_tumor.main(["--data", synth_dir, "--split", "nope.csv"])
