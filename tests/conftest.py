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
