"""torchrun: 2 ranks (gloo, one thread each) train as one process does and build its cache.

- CLIP (ragged slices of a batch of 5, class-weighted focal loss) and a CNN (test_convnext, no
  BatchNorm: on CPU each rank would normalise its own slice): the same best epoch and test
  probabilities (1e-4) as one process; the cache the 2 ranks build has the same entries, byte for
  byte, as the one built by one process.
- A killed rank ends the job with a message within a minute; --resume then finishes the run with
  the uninterrupted run's result. --amp (bfloat16) is refused on a CPU.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import baselines
import clip_tumor

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: as each rank, one thread
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", os.path.join(ROOT, script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def probabilities(run_dir):
    with open(os.path.join(run_dir, "predictions.csv")) as f:
        return np.array([row[3:] for row in csv.reader(f)][1:], float)


def cache_files(cache_dir):
    """{file name: bytes} of every entry (each starts with the SHA-1 of the rest)."""
    return {name: open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(cache_dir) for name in names if name.endswith(".bin")}


@pytest.mark.parametrize("script, main, options", [
    ("clip_tumor.py", clip_tumor.main, ["--model", "CONFIG", "--batch-size", "5",
                                        "--class-weights", "--loss", "focal", "--lr", "1e-3"]),
    ("baselines.py", baselines.main, ["--model", "test_convnext", "--train-from", "stages.2",
                                      "--image-size", "32", "--lr", "3e-3"])])
def test_two_ranks_train_and_cache_as_one_process(script, main, options, small_dir,
                                                  tiny_clip_config, tmp_path):
    options = [tiny_clip_config if x == "CONFIG" else x for x in options]
    common = ["--data", small_dir, "--pretrained", "none", "--views", "2", "--epochs", "4",
              *options]
    one = main(common + ["--cache-dir", str(tmp_path / "cache1"), "--out", str(tmp_path / "one")])
    torchrun(script, common + ["--cache-dir", str(tmp_path / "cache2"), "--out",
                               str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["best_epoch"] == one["best_epoch"]
    np.testing.assert_allclose(probabilities(tmp_path / "two"),
                               probabilities(tmp_path / "one"), atol=1e-4)
    built_by_one, built_by_two = cache_files(tmp_path / "cache1"), cache_files(tmp_path / "cache2")
    assert built_by_one and built_by_two == built_by_one


def test_a_killed_rank_ends_the_job_and_resume_finishes_it(small_dir, tiny_clip_config,
                                                           tmp_path):
    common = ["--data", small_dir, "--model", tiny_clip_config, "--pretrained", "none",
              "--views", "2", "--batch-size", "4", "--lr", "1e-3",
              "--cache-dir", str(tmp_path / "cache")]
    whole = clip_tumor.main(common + ["--epochs", "12", "--out", str(tmp_path / "whole")])
    job = torchrun("clip_tumor.py", common + ["--epochs", "12", "--out", str(tmp_path / "run")],
                   wait=False)
    while not (tmp_path / "run" / "checkpoint.pt").exists() and job.poll() is None:
        time.sleep(0.05)
    with open(f"/proc/{job.pid}/task/{job.pid}/children") as f:  # torchrun's 2 workers
        workers = [int(pid) for pid in f.read().split()]
    rank_1 = [pid for pid in workers if b"\0RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read()]
    os.kill(rank_1[0], signal.SIGKILL)
    killed = time.time()
    _, errors = job.communicate(timeout=60)
    assert job.returncode != 0 and time.time() - killed < 60
    assert "SIGKILL" in errors, errors[-3000:]
    torchrun("clip_tumor.py", ["--resume", str(tmp_path / "run")])
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["best_epoch"] == whole["best_epoch"]
    np.testing.assert_allclose(probabilities(tmp_path / "run"),
                               probabilities(tmp_path / "whole"), atol=1e-4)


def test_amp_is_refused_on_cpu(small_dir, tmp_path):
    with pytest.raises(SystemExit, match="--amp : CUDA only"):
        clip_tumor.main(["--data", small_dir, "--device", "cpu", "--amp", "--out", str(tmp_path)])
