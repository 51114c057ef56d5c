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
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "clip-tiny.json"
    path.write_text(json.dumps(clip_tumor.TINY_CONFIG))
    return str(path)


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
