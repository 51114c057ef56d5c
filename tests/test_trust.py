"""Issue 11: what used to be silently wrong, lost data, or crashed late (each fails on the old code).

- The feature cache: keyed on the architecture (QuickGELU vs GELU), one cache for every head,
  damaged entries recomputed (a rerun after flipping bytes in every entry gives the same
  predictions), a full disk leaves no temporary file and names the path.
- Runs: a diverging loss stops with a message (no NaN in metrics.json); --overwrite keeps the
  user's files and a failed input check deletes nothing; a live run's folder is refused; the
  default run name carries head and loss; early messages for a bad seed, device, --out, weights.
- Resume: a run killed before its first checkpoint, a longer --epochs.
- Issue 12: a run on class folders counts the test images with a copy in training (any split).
- Local OpenAI weights: the -quickgelu model is named.
- Issue 22 (a hostile new user): --demo replaces only its own run; a failed --overwrite keeps the
  old run in replaced/ and says so; Ctrl-C names the --resume command and releases the lock;
  --resume refuses another --out, fewer epochs and changed images, names ignored options, takes a
  moved --data; a NaN validation loss is never selected; damaged checkpoints stop, named; an
  unwritable cache stops before the claim, a full one is only read; --eps, --batch-size 1,
  a missing --pretrained file and offline weights (CLIP, BLIP, timm) give one-line errors at once.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import open_clip
import pytest
import torch

import clip_tumor
import data

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def run(small_dir, config, tmp_path, *extra):
    return clip_tumor.main(["--data", small_dir, "--model", config, "--pretrained", "none",
                            "--views", "2", "--lr", "1e-3", "--val-fraction", "0.25",
                            "--cache-dir", str(tmp_path / "cache"), *extra])


def tiny(config, **changes):
    return clip_tumor.build_model(argparse.Namespace(**dict(dict(
        model=config, pretrained="none", head="cosine", seed=0, benchmark=False, epochs=1,
        trainable_blocks=2), **changes)))


def predictions(folder):
    with open(os.path.join(folder, "predictions.csv")) as f:
        return [(row["path"], row["pred"]) for row in csv.DictReader(f)]


def test_cache_key_has_the_architecture_and_is_shared_by_heads(tiny_clip_config, tmp_path):
    quick = tmp_path / "clip-tiny-quick.json"
    quick.write_text(json.dumps(dict(clip_tumor.TINY_CONFIG, quick_gelu=True)))
    plain, quick_gelu = tiny(tiny_clip_config), tiny(str(quick))
    assert plain.cache_key["frozen_digest"] == quick_gelu.cache_key["frozen_digest"]
    cache = str(tmp_path / "cache")
    assert data.FeatureCache(cache, plain).dir != data.FeatureCache(cache, quick_gelu).dir
    heads = {data.FeatureCache(cache, tiny(tiny_clip_config, head=head)).dir
             for head in ("cosine", "mlp", "fusion")}
    assert heads == {data.FeatureCache(cache, plain).dir}


def test_damaged_cache_entries_are_recomputed_with_the_same_result(small_dir, tiny_clip_config,
                                                                   tmp_path, capsys):
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "2", "--out", str(tmp_path / "a"))
    entries = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path / "cache")
               for name in names if name.endswith(".bin")]
    for path in entries:  # flip one byte in the middle of every entry
        with open(path, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "2", "--out", str(tmp_path / "b"))
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("feature cache:") and "damaged" in line]  # one line in all
    assert len(printed) == 1 and printed[0].endswith(
        f"damaged entries (checksum mismatch) recomputed in {os.path.dirname(os.path.dirname(entries[0]))}")
    assert 0 < int(printed[0].split()[2]) <= len(entries)  # the entries the run read
    assert predictions(tmp_path / "a") == predictions(tmp_path / "b")


def test_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(temporary, path):  # the temporary file is written, its rename fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit, match=r"checkpoint.pt: cannot write \(No space left"):
        clip_tumor.atomic_save({}, str(tmp_path / "checkpoint.pt"))
    assert os.listdir(tmp_path) == []


def test_diverging_training_stops_with_a_message(small_dir, tiny_clip_config, tmp_path):
    with pytest.raises(SystemExit, match=r"diverged; try a lower --lr"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "3", "--head", "mlp",
            "--lr", "1e6", "--warmup-epochs", "0", "--out", str(tmp_path / "nan"))
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_overwrite_keeps_user_files_and_a_failed_check_deletes_nothing(small_dir,
                                                                       tiny_clip_config, tmp_path):
    out = tmp_path / "run"
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no such folder|not found|does not exist"):
        run(str(tmp_path / "typo"), tiny_clip_config, tmp_path, "--epochs", "0", "--out",
            str(out), "--overwrite")
    assert (out / "metrics.json").exists()
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out), "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").exists()
    assert not (out / "replaced").exists()


def test_a_folder_held_by_a_live_run_is_refused(small_dir, tiny_clip_config, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".lock").write_text(str(other.pid))
        with pytest.raises(SystemExit, match=f"another run \\(pid {other.pid}\\)"):
            run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out))
    finally:
        other.kill()
        other.wait()
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out))  # now stale


def test_default_run_name_carries_head_and_loss(small_dir, tiny_clip_config, tmp_path,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--head", "mlp", "--loss",
        "focal")
    assert (tmp_path / "runs" / "clip-clip-tiny-mlp-focal-seed42" / "metrics.json").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", r"--seed -1: 0 to 2\*\*32 - 1"),
    ("--seed", str(2 ** 32), r"--seed 4294967296: 0 to 2\*\*32 - 1"),
    ("--device", "cuda" if not torch.cuda.is_available() else "tpu", r"--device .*: use auto"),
    ("--device", "gpu0", r"--device gpu0: use auto"),
])
def test_bad_options_stop_early(small_dir, tiny_clip_config, tmp_path, option, value, message):
    with pytest.raises(SystemExit, match=message):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", option, value)


def test_out_that_is_a_file_or_unwritable_stops_early(small_dir, tiny_clip_config, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit, match="file.txt: is a file"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out",
            str(tmp_path / "file.txt"))
    with pytest.raises(SystemExit, match="cannot write there"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out",
            str(tmp_path / "file.txt" / "run"))


def test_a_file_that_is_not_weights_is_named(tiny_clip_config, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.txt: not weights of clip-tiny"):
        clip_tumor.load_clip(tiny_clip_config, str(notes))


def test_local_openai_weights_need_their_activation_said(tmp_path, monkeypatch):
    """A local file for a model whose OpenAI weights use QuickGELU stops (it used to print a
    note and train with GELU) until --model ...-quickgelu or --activation says which."""
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"stand-in")
    stand_in, created = argparse.Namespace(visual=torch.nn.Linear(1, 1)), []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: created.append((a, k)) or
                        stand_in)
    with pytest.raises(SystemExit, match="pass --model ViT-B-16-quickgelu .* or --activation gelu"):
        clip_tumor.load_clip("ViT-B-16", str(weights))
    assert created == []
    for activation, quick in (("gelu", False), ("quickgelu", True), (None, False)):
        model = "ViT-B-16-quickgelu" if activation is None else "ViT-B-16"
        clip_tumor.load_clip(model, str(weights), activation)
        assert created[-1][1]["force_quick_gelu"] is quick


def test_resume_before_the_first_checkpoint_and_with_more_epochs(small_dir, tiny_clip_config,
                                                                  tmp_path, monkeypatch):
    whole = run(small_dir, tiny_clip_config, tmp_path, "--epochs", "2", "--out",
                str(tmp_path / "whole"))

    def killed(obj, path):
        raise KeyboardInterrupt  # Ctrl-C during epoch 1, before any checkpoint

    original = clip_tumor.atomic_save
    monkeypatch.setattr(clip_tumor, "atomic_save", killed)
    with pytest.raises(SystemExit, match="Ctrl-C.*--resume"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--out",
            str(tmp_path / "early"))
    monkeypatch.setattr(clip_tumor, "atomic_save", original)
    config = json.loads((tmp_path / "early" / "config.json").read_text())
    for option in ("shots", "calibrate", "trainable_blocks"):  # a run made by an older version
        del config["args"][option]
    (tmp_path / "early" / "config.json").write_text(json.dumps(config))
    resumed = clip_tumor.main(["--resume", str(tmp_path / "early")])
    assert resumed["epochs"] == 1
    longer = clip_tumor.main(["--resume", str(tmp_path / "early"), "--epochs", "2"])
    assert longer["epochs"] == 2 and longer["test"]["accuracy"] == whole["test"]["accuracy"]
    assert longer["test"]["loss"] == pytest.approx(whole["test"]["loss"], abs=1e-6)


def test_class_folder_run_reports_copies_across_its_random_split(tiny_clip_config, tmp_path):
    """Issue 12: on class folders (a seeded 80/20 split) the run counts the test images with a
    mirrored or re-encoded copy in train/val and scores test_leak_free on exactly the others."""
    from PIL import Image, ImageOps
    kaggle = data.write_synthetic_dataset(str(tmp_path / "kaggle"), per_class=10, seed=5)
    root, partner = tmp_path / "folders", {}
    for name in data.CLASSES:  # class folders: the Training images, plus copies of four of them
        (root / name).mkdir(parents=True)
        for k, file in enumerate(sorted(os.listdir(os.path.join(kaggle, "Training", name)))):
            image = Image.open(os.path.join(kaggle, "Training", name, file))
            image.save(root / name / file)
            if k < 4:
                copy = ImageOps.mirror(image) if k % 2 else image.resize((64, 64))
                copy.save(root / name / f"copy_{file}", quality=85)
                partner[f"{name}/copy_{file}"] = f"{name}/{file}"
                partner[f"{name}/{file}"] = f"{name}/copy_{file}"
    out = tmp_path / "run"
    metrics = run(str(root), tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out))
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    test_paths = {row["path"] for row in rows}
    leaky = {p for p in test_paths if p in partner and partner[p] not in test_paths}
    assert metrics["n_test_with_train_copy"] == len(leaky) > 0
    kept = [row for row in rows if row["path"] not in leaky]
    assert metrics["test_leak_free"]["n"] == len(kept)
    assert metrics["test_leak_free"]["accuracy"] == pytest.approx(
        sum(row["label"] == row["pred"] for row in kept) / len(kept))
    assert f"{len(leaky)} of {len(rows)} test images have" in (out / "report.txt").read_text()


# ---- issue 22: a hostile new user ------------------------------------------------------------

def demo_in(tmp_path, monkeypatch, small_dir):
    """--demo with its folder in tmp_path and the small dataset as its data (no 300-image write)."""
    monkeypatch.setattr(clip_tumor, "DEMO_DIR", str(tmp_path / "demo"))
    os.makedirs(tmp_path / "demo")
    os.symlink(small_dir, tmp_path / "demo" / "data-v2")


def test_demo_replaces_only_its_own_run_and_overwrite_keeps_the_old_one_until_done(
        small_dir, tiny_clip_config, tmp_path, monkeypatch, capsys, one_thread):
    """--demo turned --overwrite on: it replaced any run, or a user's files, in --out. Now it
    replaces only its own earlier demo run; else --overwrite, through replaced/, which keeps the
    old run (said) when the new one fails, and moves the old model's predictions_*.csv along."""
    demo_in(tmp_path, monkeypatch, small_dir)
    out, demo = tmp_path / "mine", ["--demo", "--epochs", "1", "--views", "1"]
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(out))
    (out / "predictions_scans.csv").write_text("the old model's")
    with pytest.raises(SystemExit, match="mine: run folder exists; pass --resume"):
        clip_tumor.main(demo + ["--out", str(out)])
    def ctrl_c(obj, path):  # in epoch 1
        raise KeyboardInterrupt

    original = clip_tumor.atomic_save
    monkeypatch.setattr(clip_tumor, "atomic_save", ctrl_c)
    with pytest.raises(SystemExit, match=r"stopped \(Ctrl-C\); continue .* --resume .*mine"):
        clip_tumor.main(demo + ["--out", str(out), "--overwrite"])
    assert "the earlier run it replaces is kept in" in capsys.readouterr().out
    assert {"config.json", "metrics.json", "predictions_scans.csv"} <= set(os.listdir(
        out / "replaced"))
    assert not (out / ".lock").exists() and not (out / "predictions_scans.csv").exists()
    monkeypatch.setattr(clip_tumor, "atomic_save", original)
    clip_tumor.main(demo + ["--out", str(out), "--overwrite"])
    assert not (out / "replaced").exists()
    first = clip_tumor.main(demo + ["--out", str(out)])  # its own demo run: replaced
    assert first["epochs"] == 1 and json.loads((out / "config.json").read_text())["args"]["demo"]


def test_resume_refuses_another_out_fewer_epochs_and_changed_images(
        small_dir, tiny_clip_config, tmp_path, monkeypatch, capsys, one_thread):
    """--resume A --out B rewrote A; --epochs 1 on a 2-epoch run wrote epochs 1, best epoch 2;
    images added to --data mixed datasets; --data and other options were ignored silently;
    relative paths broke a resume from another folder; --demo --resume made it 20 epochs."""
    dataset = tmp_path / "data"
    shutil.copytree(small_dir, dataset)
    monkeypatch.chdir(tmp_path)  # relative --data and --cache-dir
    first = clip_tumor.main(["--data", "data", "--model", tiny_clip_config, "--pretrained", "none",
                             "--views", "1", "--val-fraction", "0.25", "--epochs", "2",
                             "--out", "run", "--cache-dir", "cache"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["data"] == str(dataset) and config["args"]["cache_dir"] == str(
        tmp_path / "cache")
    assert len(config["split"]["test"]) == 20 and "Testing/glioma/glioma_0000.jpg" in config[
        "split"]["test"]
    for extra, message in ((["--out", "elsewhere"], "--out elsewhere: a resumed run continues in "
                                                    "its own folder"),
                           (["--epochs", "1"], "--epochs 1: the run has done 2: 2 or more")):
        with pytest.raises(SystemExit, match=message):
            clip_tumor.main(["--resume", "run", *extra])
    shutil.copy(dataset / "Testing" / "glioma" / "glioma_0000.jpg",
                dataset / "Testing" / "glioma" / "new.jpg")
    with pytest.raises(SystemExit, match=r"dataset changed since the run started \(1 added, 0 "
                                         r"removed, 0 changed: test/Testing/glioma/new.jpg\)"):
        clip_tumor.main(["--resume", "run", "--epochs", "3"])
    os.remove(dataset / "Testing" / "glioma" / "new.jpg")
    os.rename(dataset, tmp_path / "moved")  # a moved dataset, resumed from another folder
    monkeypatch.chdir(tmp_path / "moved")
    capsys.readouterr()
    resumed = clip_tumor.main(["--resume", str(tmp_path / "run"), "--data", ".", "--epochs", "3",
                               "--lr", "5"])
    assert "ignored with --resume (the run keeps its own options): --lr 5.0" in \
        capsys.readouterr().out
    assert resumed["epochs"] == 3 and first["best_epoch"] <= resumed["best_epoch"] <= 3
    demo_in(tmp_path, monkeypatch, small_dir)
    again = clip_tumor.main(["--demo", "--resume", str(tmp_path / "run"), "--data", "."])
    assert again["epochs"] == 3  # not the demo's 20


def test_a_run_stopped_during_the_cache_build_resumes(small_dir, tiny_clip_config, tmp_path,
                                                      monkeypatch, one_thread):
    """config.json was written after the feature cache's build: a run stopped there could not
    --resume ("no config.json"). It is written first now."""
    build = data.build_cache

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "build_cache", ctrl_c)
    with pytest.raises(SystemExit, match="Ctrl-C"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--out", str(tmp_path / "r"))
    monkeypatch.setattr(data, "build_cache", build)
    assert clip_tumor.main(["--resume", str(tmp_path / "r")])["epochs"] == 1


def test_ctrl_c_before_the_run_folder_is_claimed_says_nothing_was_written(
        small_dir, tiny_clip_config, tmp_path, monkeypatch):
    """Ctrl-C while the images are hashed (before any file is written) ends with one line, no
    traceback, and no run folder."""
    def ctrl_c(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "file_hash", ctrl_c)
    with pytest.raises(SystemExit, match=r"stopped \(Ctrl-C\) before the run began; nothing"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_diverged_or_damaged_run_never_serves_nan(small_dir, tiny_clip_config, tmp_path,
                                                    monkeypatch, one_thread):
    """An epoch whose validation loss is NaN was saved as best.pt; a damaged or truncated
    checkpoint loaded with strict=False (or gave a traceback). Both now stop, naming the file."""
    import predict
    original, calls = clip_tumor.predict, []

    def nan_at_epoch_1(inputs, batch_size):
        logits, loss = original(inputs, batch_size)
        calls.append(1)
        return logits, float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(clip_tumor, "predict", nan_at_epoch_1)
    out = tmp_path / "run"
    metrics = run(small_dir, tiny_clip_config, tmp_path, "--epochs", "2", "--out", str(out))
    assert metrics["best_epoch"] == 2
    monkeypatch.setattr(clip_tumor, "predict", lambda *a: (original(*a)[0], float("nan")))
    with pytest.raises(SystemExit, match="no epoch had a finite val loss: training diverged"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--out", str(tmp_path / "n"))
    assert not (tmp_path / "n" / "best.pt").exists() and not (tmp_path / "n" / ".lock").exists()
    images = os.path.join(small_dir, "Testing")
    best, checkpoint = out / "best.pt", out / "checkpoint.pt"
    saved = clip_tumor.load_checkpoint(str(best))
    clip_tumor.atomic_save(dict(saved, model=dict(list(saved["model"].items())[1:])), str(best))
    with pytest.raises(SystemExit, match="best.pt: not the trainable weights of this CLIPClass"):
        predict.main([str(out), images])  # one weight missing: strict=False skipped it
    saved["model"] = {k: v.float() * float("nan") for k, v in saved["model"].items()}
    clip_tumor.atomic_save(saved, str(best))
    with pytest.raises(SystemExit, match="best.pt: weights that are not finite"):
        predict.main([str(out), images])
    stored = bytearray(best.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    best.write_bytes(bytes(stored))
    with pytest.raises(SystemExit, match="best.pt: missing, damaged or truncated"):
        predict.main([str(out), images])
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="checkpoint.pt: missing, damaged or truncated"):
        clip_tumor.main(["--resume", str(out)])


def test_an_unwritable_cache_stops_before_the_claim_and_a_full_one_is_only_read(
        small_dir, tiny_clip_config, tmp_path, monkeypatch, one_thread):
    """A --cache-dir that cannot be written stopped with a traceback, leaving the claimed run
    folder with .lock and replaced/; a fully cached read-only one was refused ("free disk")."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write"):
        run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--cache-dir",
            str(tmp_path / "file" / "cache"), "--out", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(tmp_path / "b"))
    cache, write = str(tmp_path / "cache"), data.stats.atomic_write

    def read_only_cache(path, *args):
        assert not str(path).startswith(cache), f"wrote {path}"
        return write(path, *args)

    monkeypatch.setattr(data.stats, "atomic_write", read_only_cache)
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "0", "--out", str(tmp_path / "c"))


def test_eps_batch_size_and_weights_are_checked_early(small_dir, tiny_clip_config, tmp_path,
                                                      monkeypatch, one_thread):
    """--eps 2.0 was accepted; --batch-size 1 was refused for heads without BatchNorm; a missing
    --pretrained FILE said "Offline?"; offline, the hub was retried for 51 s."""
    import huggingface_hub
    run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", "--batch-size", "1", "--out",
        str(tmp_path / "b"))
    for extra, message in ((["--eps", "2.0"], r"--eps 2.0: in \(0, 1\]"),
                           (["--head", "mlp", "--batch-size", "1"], "at least 2 for BatchNorm")):
        with pytest.raises(SystemExit, match=message):
            run(small_dir, tiny_clip_config, tmp_path, "--epochs", "1", *extra)
    with pytest.raises(SystemExit, match="weights.bin: no such file, nor a tag of clip-tiny"):
        clip_tumor.load_clip(tiny_clip_config, str(tmp_path / "weights.bin"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(clip_tumor.socket, "create_connection", offline)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: open_clip.factory.
                        download_pretrained_from_hf("timm/vit_base_patch16_clip_224.openai"))
    with pytest.raises(SystemExit, match="cannot obtain the weights 'openai' of ViT-B-16"):
        clip_tumor.load_clip("ViT-B-16", "openai")
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    # BLIP's and timm's downloads too: at once (they had waited ~25 s for the hub's retries)
    import blip_tumor
    import baselines
    from transformers import BlipForImageTextRetrieval
    for load, message in ((lambda: blip_tumor.load_blip(
            BlipForImageTextRetrieval, "Salesforce/blip-itm-base-coco", (), "", ""),
            "cannot load BLIP"), (lambda: baselines.build_model(argparse.Namespace(
                model="resnet50", pretrained="default", trainable_blocks=2, epochs=1, seed=0,
                benchmark=False)), "cannot download resnet50")):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        started = time.time()
        with pytest.raises(SystemExit, match=message):
            load()
        assert huggingface_hub.constants.HF_HUB_OFFLINE and time.time() - started < 5
