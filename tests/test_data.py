"""Data registry: real Fashion-MNIST/digits, and fake CIFAR-10/ImageNet/Speech Commands
folders built here in the official layouts."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from maddnet.cli import main as cli_main
from maddnet.data import create_dataset, list_datasets
from maddnet.data import fashion_mnist as fmnist
from maddnet.data.audio_features import FeatureConfig, clip_features
from maddnet.data.holdout import check_validation_unseen, holdout_indices
from maddnet.retrain.config import RetrainConfig
from maddnet.retrain.pipeline import build_dense_model

# ---------------------------------------------------------------- registry and errors


def test_registry_and_errors():
    assert {"fashion_mnist", "digits", "cifar10", "imagenet", "speech_commands", "synthetic"} <= set(
        list_datasets()
    )
    with pytest.raises(KeyError, match="fashion_mnist"):
        create_dataset("mnist-ish")
    with pytest.raises(ValueError, match="split"):
        create_dataset("digits", "training")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        create_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="validation_list.txt"):
        create_dataset("speech_commands", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        create_dataset("imagenet", "train", root=tmp_path)


def test_missing_data_skips_or_fails_as_required(require_data, monkeypatch):
    monkeypatch.delenv("MADDNET_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such data"):
        require_data(False, "no such data")
    monkeypatch.setenv("MADDNET_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="MADDNET_REQUIRE_DATA"):
        require_data(False, "no such data")
    require_data(True, "present: neither skips nor fails")


# ---------------------------------------------------------------- real data sets


def test_fashion_mnist(require_data):
    require_data(fmnist.is_available(), "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    train = create_dataset("fashion_mnist", "train")
    test = create_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.info.num_classes == 10 and train.info.input_shape == (1, 28, 28)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y == 9  # the first test image is an ankle boot
    # normalised with the training-set statistics: mean ≈ 0, std ≈ 1
    batch = torch.stack([train[i][0] for i in range(0, 60_000, 60)])
    assert abs(batch.mean().item()) < 0.05 and abs(batch.std().item() - 1) < 0.05
    # holdout=5000: val is 5,000 training images, train the other 55,000, test untouched
    val = create_dataset("fashion_mnist", "val", holdout=5000)
    assert len(val) == 5000 and len(create_dataset("fashion_mnist", "train", holdout=5000)) == 55_000
    assert torch.equal(
        val.images, train.images[torch.from_numpy(holdout_indices("fashion_mnist", "val", 60_000, 5000))]
    )
    with pytest.raises(ValueError, match="'fashion_mnist' has no validation split"):
        create_dataset("fashion_mnist", "val")
    # the old array interface still works (benchmarks use it)
    images, labels = fmnist.load_arrays("test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_download_from_a_mirror(tmp_path, require_data):
    require_data(fmnist.is_available(), "Fashion-MNIST not installed (serves as the mirror)")
    mirror = fmnist.find_root().as_uri() + "/"
    fmnist.download(tmp_path, base_url=mirror)
    assert fmnist.find_root(tmp_path) == tmp_path
    assert not list(tmp_path.glob("*.part"))
    images, _ = fmnist.load_arrays("test", tmp_path)
    assert images.shape == (10_000, 28, 28)


def test_digits_split_is_fixed_and_disjoint():
    train, test = create_dataset("digits", "train"), create_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.info.input_shape == (1, 8, 8)
    train_rows = {tuple(train.images[i].flatten().tolist()) for i in range(len(train))}
    overlap = sum(tuple(test.images[i].flatten().tolist()) in train_rows for i in range(len(test)))
    assert overlap < 5  # the set has a few exact duplicate images, no more
    assert torch.equal(create_dataset("digits", "test").images, test.images)


def _rows(dataset) -> list[tuple]:
    return [
        tuple(dataset.images[i].flatten().tolist()) + (int(dataset.labels[i]),) for i in range(len(dataset))
    ]


def test_holdout_val_split_is_fixed_disjoint_and_leaves_test_alone():
    full = create_dataset("digits", "train")
    train = create_dataset("digits", "train", holdout=300, seed=1)
    val = create_dataset("digits", "val", holdout=300, seed=2, augment=True)
    assert (len(train), len(val)) == (len(full) - 300, 300)
    # the two parts are the full training split, each sample exactly once, in its order
    chosen = holdout_indices("digits", "val", len(full), 300)
    rest = np.setdiff1d(np.arange(len(full)), chosen)
    assert torch.equal(val.images, full.images[torch.from_numpy(chosen)])
    assert torch.equal(train.images, full.images[torch.from_numpy(rest)])
    assert torch.equal(train.labels, full.labels[torch.from_numpy(rest)])
    # fixed by HOLDOUT_SEED, not by the run's seed
    assert torch.equal(create_dataset("digits", "val", holdout=300, seed=7).images, val.images)
    assert torch.equal(
        create_dataset("digits", "test", holdout=300).images, create_dataset("digits", "test").images
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "'digits' has no validation split of its own: pass holdout=N"),
        ({"split": "train", "holdout": 1438}, "holdout=1438 must be below its 1438 training samples"),
        ({"split": "val", "holdout": -1}, "must be >= 0"),
        ({"split": "train", "holdout": 0.1}, "integer count"),
    ],
)
def test_holdout_errors_name_the_data_set(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_dataset("digits", **kwargs)


def test_holdout_on_cifar10_and_imagenet_layouts(tmp_path):
    make_fake_cifar(tmp_path)
    train = create_dataset("cifar10", "train", root=tmp_path, holdout=10)
    val = create_dataset("cifar10", "val", root=tmp_path, holdout=10)
    assert (len(train), len(val)) == (20, 10)
    assert set(_rows(train)).isdisjoint(_rows(val))
    with pytest.raises(ValueError, match="'cifar10' has no validation split"):
        create_dataset("cifar10", "val", root=tmp_path)
    make_fake_imagenet(tmp_path / "inet")
    train = create_dataset("imagenet", "train", root=tmp_path / "inet", image_size=32, holdout=2)
    val = create_dataset("imagenet", "val", root=tmp_path / "inet", image_size=32, holdout=2)
    assert (len(train), len(val)) == (4, 2)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert val.folder.root.endswith("train")  # held out of the training folder, not val/
    # without holdout, val reads val/ only when test/ exists (else test reads val/ too)
    with pytest.raises(ValueError, match="'imagenet' has no test folder"):
        create_dataset("imagenet", "val", root=tmp_path / "inet", image_size=32)
    (tmp_path / "inet" / "val").rename(tmp_path / "inet" / "test")
    make_fake_imagenet(tmp_path / "inet2")
    (tmp_path / "inet2" / "test").symlink_to(tmp_path / "inet" / "test")
    assert len(create_dataset("imagenet", "val", root=tmp_path / "inet2", image_size=32)) == 6
    for name, root in (("cifar10", tmp_path), ("imagenet", tmp_path / "inet2")):
        with pytest.raises(ValueError, match=f"'{name}': holdout=30 must be below"):
            create_dataset(name, "val", root=root, holdout=30)
        with pytest.raises(ValueError, match=f"'{name}': holdout must be an integer"):
            create_dataset(name, "test", root=root, holdout=True)
    assert len(create_dataset("cifar10", "val", root=tmp_path, holdout=np.int64(3))) == 3


def test_validation_on_samples_the_weights_trained_on_is_refused(tmp_path):
    weights = tmp_path / "run" / "checkpoint.pt"
    weights.parent.mkdir()
    (weights.parent / "config.json").write_text(json.dumps({"dataset": "digits", "dataset_kwargs": {}}))
    with pytest.raises(ValueError, match=r"holdout=0 .*validates on holdout=300.*--data-kw holdout=300"):
        check_validation_unseen(weights, "digits", {"holdout": 300}, "val")
    check_validation_unseen(weights, "digits", {"holdout": 300}, "test")  # test: never trained on
    check_validation_unseen(weights, "fashion_mnist", {"holdout": 300}, "val")  # another data set
    check_validation_unseen(tmp_path / "model.pt", "digits", {"holdout": 300}, "val")  # no config
    (weights.parent / "config.json").write_text(
        json.dumps({"dataset": "digits", "dataset_kwargs": {"holdout": 300}})
    )
    check_validation_unseen(weights, "digits", {"holdout": 300}, "val")  # the same held-out samples
    # the entry points check it before reading any weights
    (weights.parent / "config.json").write_text(json.dumps({"dataset": "digits", "dataset_kwargs": {}}))
    common = [
        "--model",
        "resnet9",
        "--data",
        "digits",
        "--data-kw",
        "holdout=300",
        "--checkpoint",
        str(weights),
    ]
    with pytest.raises(ValueError, match="were in those weights' training data"):
        build_dense_model(
            RetrainConfig.from_dict(
                {
                    "model": "resnet9",
                    "dataset": "digits",
                    "dataset_kwargs": {"holdout": 300},
                    "checkpoint": str(weights),
                    "eval_split": "val",
                }
            ),
            create_dataset("digits", "train", holdout=300).info,
        )
    assert cli_main(["analyze", *common, "--eval-split", "val", "--out", str(tmp_path / "a")]) == 2


def test_augmentation_is_seeded_per_epoch_and_index():
    data = create_dataset("digits", "train", augment=True, seed=3)
    data.set_epoch(0)
    a0 = [data[i][0] for i in range(20)]
    assert all(torch.equal(a, data[i][0]) for i, a in enumerate(a0))  # repeatable
    data.set_epoch(1)
    a1 = [data[i][0] for i in range(20)]
    assert sum(not torch.equal(a, b) for a, b in zip(a0, a1, strict=True)) >= 10
    plain = create_dataset("digits", "train")
    assert all(torch.equal(plain[i][0], plain[i][0]) for i in range(5))


def test_synthetic_is_learnable_shape():
    data = create_dataset("synthetic", "train", num_samples=64, num_classes=4, input_shape=(2, 8, 8))
    x, y = data[0]
    assert x.shape == (2, 8, 8) and 0 <= y < 4 and data.info.num_classes == 4


# ---------------------------------------------------------------- CIFAR-10 (fake folder)


def make_fake_cifar(root, per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle)
    return folder


def test_cifar10_pickle_layout(tmp_path):
    folder = make_fake_cifar(tmp_path)
    train = create_dataset("cifar10", "train", root=tmp_path)
    test = create_dataset("cifar10", "test", root=folder)
    assert (len(train), len(test)) == (30, 6)
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    # CHW order of the pickle rows: first 1024 bytes are the red plane
    expected_red = raw[b"data"][2, :1024].reshape(32, 32) / 255.0
    x, y = test[2]
    mean, std = test.info.mean[0], test.info.std[0]
    assert np.allclose(x[0].numpy() * std + mean, expected_red, atol=1e-5)
    assert y == raw[b"labels"][2]
    assert create_dataset("cifar10", "train", root=tmp_path, augment=True)[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- ImageNet folders (fake)


def make_fake_imagenet(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"img{i}.JPEG")


def test_imagenet_class_folders(tmp_path):
    make_fake_imagenet(tmp_path)
    train = create_dataset("imagenet", "train", root=tmp_path, augment=True, image_size=32)
    test = create_dataset("imagenet", "test", root=tmp_path, image_size=32)  # reads val/
    assert len(train) == 6 and len(test) == 6
    assert train.info.classes == ("n01440764", "n01443537", "n01484850")
    x, y = test[5]
    assert x.shape == (3, 32, 32) and y == 2
    train.set_epoch(4)
    assert torch.equal(train[1][0], train[1][0])  # seeded random crop


# ---------------------------------------------------------------- Speech Commands (fake)

WORDS = {"yes": 440.0, "no": 880.0, "up": 1760.0, "cat": 3000.0}


def make_fake_speech_commands(root):
    """Each word is a pure tone; speakers a..e; a → validation, b → testing."""
    import soundfile

    t = np.arange(16000) / 16000
    val, test = [], []
    for word, freq in WORDS.items():
        (root / word).mkdir(parents=True)
        for speaker in "abcde":
            for n in range(2):
                rel = f"{word}/{speaker}{speaker}_nohash_{n}.wav"
                audio = 0.5 * np.sin(2 * np.pi * freq * t)
                soundfile.write(root / rel, audio[: 16000 - 800 * n], 16000)  # some short
                (val if speaker == "a" else test if speaker == "b" else []).append(rel)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "_background_noise_").mkdir()
    rng = np.random.default_rng(0)
    soundfile.write(root / "_background_noise_" / "white_noise.wav", 0.3 * rng.standard_normal(48000), 16000)


@pytest.mark.slow
def test_speech_commands_layout(tmp_path):
    make_fake_speech_commands(tmp_path)
    train = create_dataset(
        "speech_commands",
        "train",
        root=tmp_path,
        keywords="yes,no,up",
        silence_fraction=0.5,
        unknown_fraction=0.5,
    )
    val = create_dataset("speech_commands", "val", root=tmp_path, keywords=["yes", "no", "up"])
    assert train.info.classes == ("yes", "no", "up", "_unknown_", "_silence_")
    assert train.info.input_shape == (1, 49, 10)
    labels = [label for _, label in train.items]
    # 3 speakers × 2 clips × 3 keywords; unknown and silence about half of that each
    assert labels.count(0) == 6 and labels.count(3) == 6 and labels.count(4) == 9
    assert len(val) == 6 + 1 + 1  # speaker a only; 10 % unknown/silence, at least one
    x, y = val[0]
    assert x.shape == (1, 49, 10) and y == 0
    everything = create_dataset("speech_commands", "test", root=tmp_path, keywords="all", silence_fraction=0)
    assert everything.info.classes == ("cat", "no", "up", "yes") and len(everything) == 8


def test_speech_augmentation_changes_clips_deterministically(tmp_path):
    make_fake_speech_commands(tmp_path)
    data = create_dataset("speech_commands", "train", root=tmp_path, augment=True, keywords="yes,no")
    data.set_epoch(2)
    a = data[0][0]
    assert torch.equal(a, data[0][0])
    data.set_epoch(3)
    assert not torch.equal(a, data[0][0])


def test_logmel_peaks_at_the_tone_frequency():
    import librosa

    config = FeatureConfig(kind="logmel", f_max=8000.0)
    t = np.arange(16000) / 16000
    mel_centres = librosa.mel_frequencies(config.n_mels + 2, fmin=config.f_min, fmax=config.f_max)[1:-1]
    for freq in (300.0, 1000.0, 3000.0):
        features = clip_features(np.sin(2 * np.pi * freq * t), config)
        assert features.shape == (49, 40)
        band = int(features.mean(axis=0).argmax())
        assert abs(band - int(np.abs(mel_centres - freq).argmin())) <= 1
    # a louder tone is louder in dB by 20·log10(ratio): the reference is fixed
    quiet = clip_features(0.1 * np.sin(2 * np.pi * 1000 * t), config).max()
    loud = clip_features(np.sin(2 * np.pi * 1000 * t), config).max()
    assert loud - quiet == pytest.approx(20.0, abs=0.1)


def test_mfcc_are_dct_of_logmel():
    from scipy.fft import dct

    rng = np.random.default_rng(1)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    logmel = clip_features(audio, FeatureConfig(kind="logmel"))
    mfcc = clip_features(audio, FeatureConfig(kind="mfcc", n_mfcc=10))
    expected = dct(logmel, type=2, norm="ortho", axis=1)[:, :10]
    assert np.allclose(mfcc, expected, rtol=1e-4, atol=1e-3)


def test_mfcc_match_librosa_reference():
    import librosa

    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    mel = librosa.feature.melspectrogram(
        y=audio, sr=16000, n_fft=640, hop_length=320, center=False, n_mels=40, fmin=20.0, fmax=4000.0
    )
    log_mel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    expected = librosa.feature.mfcc(S=log_mel, n_mfcc=10).T
    assert np.allclose(clip_features(audio, FeatureConfig()), expected, atol=2e-3)
