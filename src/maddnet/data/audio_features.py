"""Log-mel and MFCC features of 1 s keyword clips (librosa does the DSP).

Defaults follow the DS-CNN paper (Zhang et al. 2017): 16 kHz audio, 40 ms windows,
20 ms hops, 40 mel bands, 10 MFCCs → 49 frames × 10 coefficients per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureConfig:
    kind: str = "mfcc"  # "mfcc" or "logmel"
    sample_rate: int = 16000
    clip_samples: int = 16000
    window_ms: float = 40.0
    hop_ms: float = 20.0
    n_mels: int = 40
    n_mfcc: int = 10
    f_min: float = 20.0
    f_max: float = 4000.0

    @property
    def n_fft(self) -> int:
        return int(round(self.sample_rate * self.window_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def num_frames(self) -> int:
        return 1 + (self.clip_samples - self.n_fft) // self.hop_length

    @property
    def num_coefficients(self) -> int:
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels


def clip_features(audio: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """float audio (clip_samples,) in [-1, 1] → features (num_frames, num_coefficients)
    float32: log-mel in dB, or its first n_mfcc DCT-II coefficients."""
    import librosa

    if config.kind not in ("mfcc", "logmel"):
        raise ValueError(f"unknown feature kind {config.kind!r}; use 'mfcc' or 'logmel'")
    mel = librosa.feature.melspectrogram(
        y=np.asarray(audio, dtype=np.float32), sr=config.sample_rate, n_fft=config.n_fft,
        hop_length=config.hop_length, win_length=config.n_fft, center=False,
        n_mels=config.n_mels, fmin=config.f_min, fmax=config.f_max, power=2.0)
    # fixed reference and floor (not the clip's max) so loudness differences survive
    log_mel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    if config.kind == "logmel":
        out = log_mel
    else:
        out = librosa.feature.mfcc(S=log_mel, n_mfcc=config.n_mfcc, dct_type=2, norm="ortho")
    return out.T.astype(np.float32)
