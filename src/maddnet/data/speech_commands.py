"""Google Speech Commands (v1/v2) from its folder layout, as features for KWS nets.

Layout: ``root/<word>/<speaker>_nohash_<n>.wav`` (1 s, 16 kHz mono), ``root/
validation_list.txt`` and ``root/testing_list.txt`` (paths relative to root; every
other clip is training data), ``root/_background_noise_/*.wav`` (long noise recordings).

Classes follow the usual 12-class task: the keywords, ``_silence_`` (background noise
only) and ``_unknown_`` (all other words), with silence and unknown clips each about
``silence_fraction``/``unknown_fraction`` of the split (as in the TensorFlow
speech_commands example). Training augmentation: random time shift and background noise.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from maddnet.data.audio_features import FeatureConfig, clip_features
from maddnet.data.registry import DatasetInfo, register_dataset
from maddnet.data.transforms import SeededSampleMixin, sample_seed

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
NOISE_FOLDER = "_background_noise_"
ENV_VAR = "MADDNET_SPEECH_COMMANDS"


@dataclass(frozen=True)
class AudioAugment:
    time_shift_ms: float = 100.0
    noise_probability: float = 0.8
    noise_volume: float = 0.1


def read_wav(path: str | os.PathLike, clip_samples: int, sample_rate: int) -> np.ndarray:
    """Mono float32 audio, zero-padded or cut to ``clip_samples``."""
    import soundfile

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
    audio = audio.mean(axis=1)
    if audio.shape[0] < clip_samples:
        audio = np.pad(audio, (0, clip_samples - audio.shape[0]))
    return audio[:clip_samples]


def find_root(root: str | os.PathLike | None) -> Path:
    base = root if root is not None else os.environ.get(ENV_VAR)
    if base is None:
        raise FileNotFoundError(f"Speech Commands needs a root folder (argument root or ${ENV_VAR})")
    path = Path(base)
    if not (path / "validation_list.txt").is_file() or not (path / "testing_list.txt").is_file():
        raise FileNotFoundError(
            f"{path} is not a Speech Commands folder: it needs "
            "validation_list.txt and testing_list.txt next to the word folders"
        )
    return path


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def split_files(root: Path, split: str) -> dict[str, list[str]]:
    """Relative wav paths of ``split``, grouped by word (folder name), sorted."""
    val, test = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    words: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != NOISE_FOLDER):
        for wav in sorted(folder.glob("*.wav")):
            rel = f"{folder.name}/{wav.name}"
            in_split = {"val": rel in val, "test": rel in test}.get(split, rel not in val and rel not in test)
            if in_split:
                words.setdefault(folder.name, []).append(rel)
    return words


class SpeechCommandsDataset(SeededSampleMixin, Dataset):
    """Items: features (1, frames, coefficients) float32 and a class index."""

    def __init__(
        self,
        root: Path,
        split: str,
        keywords: tuple[str, ...] = KEYWORDS,
        silence_fraction: float = 0.1,
        unknown_fraction: float = 0.1,
        features: FeatureConfig | None = None,
        augment: AudioAugment | None = None,
        seed: int = 0,
        cache: bool | None = None,
    ):
        self.root = root
        self.features = features or FeatureConfig()
        self.augment = augment
        self.seed = seed
        words = split_files(root, split)
        if keywords == ("all",):
            keywords = tuple(sorted(words))
        missing = [k for k in keywords if k not in words]
        if missing:
            raise ValueError(f"{root} has no {split} clips of {missing}; words found: {sorted(words)}")
        classes = list(keywords)
        # a fixed generator: the chosen unknown/silence items do not depend on the epoch
        rng = np.random.default_rng(int(hashlib.sha1(f"{split}".encode()).hexdigest()[:8], 16))
        items: list[tuple[str | None, int]] = [
            (rel, classes.index(word)) for word in keywords for rel in words[word]
        ]
        n_keyword = len(items)
        others = [rel for word, rels in words.items() if word not in keywords for rel in rels]
        if unknown_fraction > 0 and others:
            classes.append(UNKNOWN)
            n_unknown = min(len(others), max(1, int(round(unknown_fraction * n_keyword))))
            chosen = rng.choice(len(others), size=n_unknown, replace=False)
            items += [(others[i], len(classes) - 1) for i in sorted(chosen)]
        self.noise = self._load_noise()
        if silence_fraction > 0:
            classes.append(SILENCE)
            n_silence = max(1, int(round(silence_fraction * n_keyword)))
            items += [(None, len(classes) - 1)] * n_silence
        self.items = items
        self.info = DatasetInfo(
            name="speech_commands",
            classes=tuple(classes),
            input_shape=(1, self.features.num_frames, self.features.num_coefficients),
        )
        self.cache_enabled = augment is None if cache is None else cache
        self._cache: dict[int, torch.Tensor] = {}

    def _load_noise(self) -> list[np.ndarray]:
        import soundfile

        folder = self.root / NOISE_FOLDER
        clips = []
        for wav in sorted(folder.glob("*.wav")) if folder.is_dir() else []:
            audio, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
            if rate == self.features.sample_rate and audio.shape[0] >= self.features.clip_samples:
                clips.append(audio.mean(axis=1))
        return clips

    def __len__(self) -> int:
        return len(self.items)

    def _noise_segment(self, rng: np.random.Generator) -> np.ndarray:
        n = self.features.clip_samples
        if not self.noise:
            return np.zeros(n, dtype=np.float32)
        noise = self.noise[rng.integers(len(self.noise))]
        start = rng.integers(0, noise.shape[0] - n + 1)
        return noise[start : start + n]

    def audio(self, index: int) -> np.ndarray:
        """The (augmented) waveform of item ``index``: (clip_samples,) float32."""
        rel, _ = self.items[index]
        n = self.features.clip_samples
        seed_epoch = self.epoch if self.augment is not None else 0
        rng = np.random.default_rng(sample_seed(self.seed, seed_epoch, index))
        if rel is None:
            # silence: background noise at a random volume (zeros without noise files)
            return (self._noise_segment(rng) * rng.uniform(0, 1)).astype(np.float32)
        audio = read_wav(self.root / rel, n, self.features.sample_rate)
        if self.augment is not None:
            shift = int(self.augment.time_shift_ms * self.features.sample_rate / 1000)
            offset = int(rng.integers(-shift, shift + 1))
            audio = np.roll(np.pad(audio, shift), offset)[shift : shift + n]
            if self.noise and rng.uniform() < self.augment.noise_probability:
                volume = rng.uniform(0, self.augment.noise_volume)
                audio = np.clip(audio + volume * self._noise_segment(rng), -1.0, 1.0)
        return audio.astype(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self._cache:
            return self._cache[index], self.items[index][1]
        features = torch.from_numpy(clip_features(self.audio(index), self.features)).unsqueeze(0)
        if self.cache_enabled:
            self._cache[index] = features
        return features, self.items[index][1]


@register_dataset("speech_commands")
def speech_commands_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    augment: bool = False,
    seed: int = 0,
    keywords: tuple[str, ...] | list[str] | str = KEYWORDS,
    silence_fraction: float = 0.1,
    unknown_fraction: float = 0.1,
    feature: str = "mfcc",
    n_mfcc: int = 10,
    n_mels: int = 40,
    cache: bool | None = None,
) -> SpeechCommandsDataset:
    """``keywords``: a list, a comma-separated string, or "all" (every word folder, no
    unknown class). ``feature``: "mfcc" (n_mfcc coefficients) or "logmel" (n_mels bands)."""
    if isinstance(keywords, str):
        keywords = ("all",) if keywords == "all" else tuple(k for k in keywords.split(",") if k)
    if tuple(keywords) == ("all",):
        unknown_fraction = 0.0
    config = FeatureConfig(kind=feature, n_mfcc=n_mfcc, n_mels=n_mels)
    return SpeechCommandsDataset(
        find_root(root),
        split,
        tuple(keywords),
        silence_fraction,
        unknown_fraction,
        config,
        AudioAugment() if augment else None,
        seed,
        cache,
    )
