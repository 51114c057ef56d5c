"""Shared fixtures: a small synthetic dataset and a tiny open_clip config (no downloads)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_tumor  # noqa: E402
import data  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Kaggle layout, 40 training and 10 test images per class."""
    return data.write_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "data"),
                                        per_class=40, seed=1)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """Kaggle layout, 8 training and 5 test images per class: runs take a second or two."""
    return data.write_synthetic_dataset(str(tmp_path_factory.mktemp("small") / "data"),
                                        per_class=8, seed=2)


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "clip-tiny.json"
    path.write_text(json.dumps(clip_tumor.TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def trained_clip_run(synth_dir, tiny_clip_config, tmp_path_factory):
    """(run folder, metrics) of the tiny CLIP trained 12 epochs on synth_dir (the plain view):
    test_clip.py checks that it learns, test_explain.py that its attention finds the lesions."""
    import torch
    folder, threads = tmp_path_factory.mktemp("trained-clip"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture: a tiny model gains nothing from two
    metrics = clip_tumor.main(["--data", synth_dir, "--model", tiny_clip_config, "--pretrained",
                               "none", "--views", "1", "--lr", "1e-3", "--epochs", "12",
                               "--cache-dir", str(folder / "cache"), "--out", str(folder / "run")])
    torch.set_num_threads(threads)
    return folder / "run", metrics


@pytest.fixture(scope="session")
def tiny_blip_weights(tmp_path_factory):
    """A tiny random BlipForImageTextRetrieval + processor folder, loaded like real weights."""
    import blip_tumor
    return blip_tumor.write_tiny_weights(str(tmp_path_factory.mktemp("blip") / "blip-tiny"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a CPU shared with other jobs two
    threads stall waiting for a busy core (test_blip.py: 30 s with one thread, minutes with two)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_cached_path_equals_full_forward(model, images, labels, every_weight_used=False):
    """model.top(model.stem(x)) gives model(x)'s logits and gradients (1e-4): the cache is exact."""
    import torch
    import torch.nn.functional as F
    params = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads(forward):
        logits = forward()
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), params, allow_unused=True)
        return logits.detach(), grads

    full_logits, full_grads = logits_and_grads(lambda: model(images))
    with torch.no_grad():
        stored = model.stem(images)
    cached_logits, cached_grads = logits_and_grads(lambda: model.top(stored))
    assert torch.allclose(cached_logits, full_logits, atol=1e-4)
    assert not every_weight_used or all(g is not None for g in full_grads)
    for full, cached in zip(full_grads, cached_grads):
        assert (full is None) == (cached is None)
        assert full is None or torch.allclose(cached, full, atol=1e-4)
    return stored


def kill_after_first_checkpoint(monkeypatch, module):
    """Make module.atomic_save raise KeyboardInterrupt right after the first checkpoint.pt, as if
    the user pressed Ctrl-C after epoch 1."""
    original, saves = module.atomic_save, []

    def killed(obj, path):
        original(obj, path)
        if path.endswith("checkpoint.pt"):
            saves.append(path)
            if len(saves) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(module, "atomic_save", killed)
