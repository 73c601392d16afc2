#!/usr/bin/env python
"""Build a small keyword-spotting set with espeak-ng, in the Google Speech Commands layout.

Every (accent, voice variant) pair is one "speaker". Each speaker says each keyword at
every (speed, pitch) of a small grid (with a little random jitter) and each "unknown"
word once; clips are 1 s, 16 kHz, placed at a random offset, at a random level, with
background noise mixed in at a random SNR. The split is by speaker, like the real
data set (speakers ordered by a hash of their id → validation_list.txt / testing_list.txt), so the test
voices are never heard in training.

    python scripts/make_kws_espeak.py --out data/kws_espeak
    maddnet train --model ds_cnn_s --data speech_commands --data-root data/kws_espeak

Needs the espeak-ng program (Debian: apt-get install espeak-ng), soundfile and scipy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly
from tqdm import tqdm

SAMPLE_RATE = 16000
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4", "klatt2")
SPEEDS = (120, 160, 200)  # words per minute
PITCHES = (30, 70)  # espeak pitch 0..99
VALIDATION_PERCENT = 10
TESTING_PERCENT = 10


@dataclass(frozen=True)
class Clip:
    word: str
    speaker: str  # "accent+variant"
    speed: int
    pitch: int
    index: int  # n in <speaker>_nohash_<n>.wav
    seed: int

    @property
    def speaker_id(self) -> str:
        return hashlib.sha1(self.speaker.encode()).hexdigest()[:8]

    @property
    def relative_path(self) -> str:
        return f"{self.word}/{self.speaker_id}_nohash_{self.index}.wav"


def assign_splits(speaker_ids: list[str]) -> dict[str, str]:
    """Speaker id → "train"/"val"/"test". Like Speech Commands, a stable hash of the
    speaker decides; with few speakers, taking the hash-ordered first 10 % for validation
    and the next 10 % for testing keeps the proportions (at least one speaker each)."""
    ordered = sorted(set(speaker_ids), key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    n_val = max(1, round(len(ordered) * VALIDATION_PERCENT / 100)) if len(ordered) >= 3 else 0
    n_test = max(1, round(len(ordered) * TESTING_PERCENT / 100)) if len(ordered) >= 3 else 0
    return {
        s: "val" if i < n_val else "test" if i < n_val + n_test else "train" for i, s in enumerate(ordered)
    }


def speak(text: str, voice: str, speed: int, pitch: int, workdir: Path) -> np.ndarray:
    """espeak-ng's speech for ``text`` as float32 audio at 16 kHz."""
    import soundfile

    with tempfile.NamedTemporaryFile(suffix=".wav", dir=workdir) as tmp:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
            check=True,
            capture_output=True,
        )
        audio, rate = soundfile.read(tmp.name, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio


def trim_silence(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > threshold * max(np.abs(audio).max(), 1e-9))
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def make_noises(seconds: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Background recordings: white, pink and brown noise and a mains hum, peak 0.5."""
    n = int(seconds * SAMPLE_RATE)
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    pink = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    brown = np.fft.irfft(spectrum / freqs, n)
    t = np.arange(n) / SAMPLE_RATE
    hum = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    hum = hum + 0.3 * rng.standard_normal(n)
    noises = {"white_noise": white, "pink_noise": pink, "brown_noise": brown, "hum": hum}
    return {name: (0.5 * x / np.abs(x).max()).astype(np.float32) for name, x in noises.items()}


def render(clip: Clip, noises: list[np.ndarray], args: argparse.Namespace, workdir: Path) -> np.ndarray:
    """The 1 s clip: speech at a random offset and level plus background noise."""
    rng = np.random.default_rng(clip.seed)
    accent, variant = clip.speaker.split("+")
    speed = int(clip.speed + rng.integers(-10, 11))
    pitch = int(np.clip(clip.pitch + rng.integers(-8, 9), 0, 99))
    speech = trim_silence(speak(clip.word, f"{accent}+{variant}", speed, pitch, workdir))
    speech = speech[:SAMPLE_RATE]
    speech = speech / max(np.abs(speech).max(), 1e-9) * rng.uniform(0.3, 0.9)
    out = np.zeros(SAMPLE_RATE, dtype=np.float32)
    start = int(rng.integers(0, SAMPLE_RATE - speech.shape[0] + 1))
    out[start : start + speech.shape[0]] = speech
    if noises and rng.uniform() < args.noise_probability:
        noise = noises[rng.integers(len(noises))]
        offset = int(rng.integers(0, noise.shape[0] - SAMPLE_RATE + 1))
        segment = noise[offset : offset + SAMPLE_RATE]
        snr_db = rng.uniform(args.min_snr, args.max_snr)
        speech_power = float(np.mean(speech**2))
        noise_power = max(float(np.mean(segment**2)), 1e-12)
        out += segment * np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))
    return np.clip(out, -1.0, 1.0)


def plan(args: argparse.Namespace) -> list[Clip]:
    """All clips to make: keywords at every speed × pitch, unknown words once each."""
    rng = np.random.default_rng(args.seed)
    clips = []
    speakers = [f"{a}+{v}" for a in args.accents for v in args.variants]
    for speaker in speakers:
        for word in args.keywords:
            grid = [(s, p) for s in args.speeds for p in args.pitches]
            for index, (speed, pitch) in enumerate(grid):
                clips.append(Clip(word, speaker, speed, pitch, index, int(rng.integers(2**62))))
        for word in args.unknown_words:
            speed, pitch = int(rng.choice(args.speeds)), int(rng.choice(args.pitches))
            clips.append(Clip(word, speaker, speed, pitch, 0, int(rng.integers(2**62))))
    return clips


def build(args: argparse.Namespace) -> dict:
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed + 1)
    noise_dir = out / "_background_noise_"
    noise_dir.mkdir(exist_ok=True)
    noises = make_noises(args.noise_seconds, rng)
    for name, audio in noises.items():
        soundfile.write(noise_dir / f"{name}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    clips = plan(args)
    split_of = assign_splits([clip.speaker_id for clip in clips])
    lists: dict[str, list[str]] = {"val": [], "test": [], "train": []}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:

        def work(clip: Clip) -> Clip:
            path = out / clip.relative_path
            path.parent.mkdir(exist_ok=True)
            audio = render(clip, list(noises.values()), args, Path(tmp))
            soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
            return clip

        for clip in tqdm(pool.map(work, clips), total=len(clips), desc="espeak-ng clips"):
            lists[split_of[clip.speaker_id]].append(clip.relative_path)
    (out / "validation_list.txt").write_text("".join(p + "\n" for p in sorted(lists["val"])))
    (out / "testing_list.txt").write_text("".join(p + "\n" for p in sorted(lists["test"])))
    summary = {
        "clips": len(clips),
        "speakers": len(args.accents) * len(args.variants),
        **{f"{k}_clips": len(v) for k, v in lists.items()},
        "keywords": list(args.keywords),
        "unknown_words": list(args.unknown_words),
        "accents": list(args.accents),
        "variants": list(args.variants),
        "speeds": list(args.speeds),
        "pitches": list(args.pitches),
        "seed": args.seed,
        "noise_probability": args.noise_probability,
        "snr_db": [args.min_snr, args.max_snr],
    }
    (out / "README.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/kws_espeak", help="output folder")
    parser.add_argument("--keywords", nargs="+", default=list(KEYWORDS))
    parser.add_argument("--unknown-words", nargs="*", default=list(UNKNOWN_WORDS))
    parser.add_argument("--accents", nargs="+", default=list(ACCENTS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--speeds", nargs="+", type=int, default=list(SPEEDS))
    parser.add_argument("--pitches", nargs="+", type=int, default=list(PITCHES))
    parser.add_argument("--noise-probability", type=float, default=0.8)
    parser.add_argument("--min-snr", type=float, default=5.0, help="dB")
    parser.add_argument("--max-snr", type=float, default=30.0, help="dB")
    parser.add_argument("--noise-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    summary = build(parse_args(argv))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
