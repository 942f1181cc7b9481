"""Audio data: WAV reading (stdlib ``wave``, scipy fallback), resampling, augmentation, and
readers for the ESC-50, Speech Commands, generic folder-per-label and Asterisk-prompt layouts.

Readers return lists of ``(path, label_index)`` plus the class names.
"""

from __future__ import annotations

import csv
import wave
from math import gcd
from pathlib import Path

import numpy as np

from adapterkit.errors import DataError

ASTERISK_DIR = "/usr/share/asterisk/sounds/en"
DIGIT_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate (channels are averaged)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"audio file not found: {p}")
    try:
        with wave.open(str(p), "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
        x = _pcm_to_float(raw, width, p)
    except wave.Error:
        x, sr, ch = _read_scipy(p)  # e.g. IEEE-float WAV, which the wave module rejects
    if ch > 1:
        x = x[: len(x) // ch * ch].reshape(-1, ch).mean(1)
    return x.astype(np.float32), int(sr)


def _pcm_to_float(raw: bytes, width: int, p: Path) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8)
        b = b[: len(b) // 3 * 3].reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    if width == 4:
        return np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    raise DataError(f"{p}: unsupported PCM sample width {width} bytes")


def _read_scipy(p: Path) -> tuple[np.ndarray, int, int]:
    from scipy.io import wavfile

    try:
        sr, data = wavfile.read(str(p))
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read WAV file {p}: {e}") from None
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    elif data.dtype.kind == "u":
        data = (data.astype(np.float32) - 128.0) / 128.0
    ch = 1 if data.ndim == 1 else data.shape[1]
    return data.reshape(-1).astype(np.float32), int(sr), ch


def resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy) from ``sr`` to ``target`` Hz."""
    if sr == target:
        return x
    from scipy.signal import resample_poly

    g = gcd(int(sr), int(target))
    return resample_poly(x, target // g, sr // g).astype(np.float32)


def fix_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def load_clip(path: str | Path, sample_rate: int, num_samples: int) -> np.ndarray:
    x, sr = read_wav(path)
    return fix_length(resample(x, sr, sample_rate), num_samples)


def augment(x: np.ndarray, rng: np.random.Generator, num_samples: int, snr_db: tuple[float, float] | None,
            speed: tuple[float, float] | None, shift: int, gain_db: tuple[float, float] | None) -> np.ndarray:
    """Speed change (resampling by linear interpolation), random shift, gain and white noise at a random SNR."""
    y = x.astype(np.float64)
    if speed is not None:
        f = rng.uniform(*speed)
        pos = np.arange(0.0, len(y) - 1, f)
        y = np.interp(pos, np.arange(len(y)), y)
    if shift:
        s = int(rng.integers(-shift, shift + 1))
        y = np.roll(np.pad(y, (abs(s), abs(s))), s)[abs(s): abs(s) + len(y)] if s else y
    y = fix_length(y, num_samples)
    if gain_db is not None:
        y = y * 10 ** (rng.uniform(*gain_db) / 20.0)
    if snr_db is not None:
        p = float(np.mean(y ** 2)) + 1e-12
        noise_p = p / 10 ** (rng.uniform(*snr_db) / 10.0)
        y = y + rng.standard_normal(len(y)) * np.sqrt(noise_p)
    return y.astype(np.float32)


# ----------------------------------------------------------------------------- layouts


def load_esc50(root: str | Path, test_folds: list[int] = (5,)) -> tuple[list, list, list[str]]:
    """ESC-50: ``meta/esc50.csv`` (filename, fold, target, category, ...) + ``audio/*.wav``."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataError(f"ESC-50 metadata not found: {meta}")
    rows = []
    with meta.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"filename", "fold", "target", "category"}
        if not need <= set(reader.fieldnames or []):
            raise DataError(f"{meta} must have the columns {sorted(need)}, has {reader.fieldnames}")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append((r["filename"], int(r["fold"]), int(r["target"]), r["category"]))
            except ValueError:
                raise DataError(f"{meta}:{i}: fold and target must be integers, got {r['fold']!r}, {r['target']!r}") from None
    if not rows:
        raise DataError(f"{meta} lists no clips")
    names: dict[int, str] = {}
    for _, _, t, c in rows:
        names.setdefault(t, c)
    targets = sorted(names)
    if targets != list(range(len(targets))):
        raise DataError(f"{meta}: targets must be 0..K-1, got {targets[:5]}...")
    test_folds = set(test_folds)
    train, test = [], []
    for fn, fold, t, _ in rows:
        (test if fold in test_folds else train).append((root / "audio" / fn, t))
    return train, test, [names[t] for t in targets]


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise DataError(f"Speech Commands split list not found: {path}")
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def load_speech_commands(root: str | Path, words: list[str] | None = None) -> tuple[list, list, list, list[str]]:
    """Google Speech Commands: ``<word>/*.wav``, ``validation_list.txt`` and ``testing_list.txt``
    (paths relative to root). Returns train, validation, test and the word list."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Speech Commands folder not found: {root}")
    val, test = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    words = list(words) if words else sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    if not words:
        raise DataError(f"{root} has no word folders")
    splits: tuple[list, list, list] = ([], [], [])
    for i, w in enumerate(words):
        folder = root / w
        if not folder.is_dir():
            raise DataError(f"word folder not found: {folder}")
        for f in sorted(folder.glob("*.wav")):
            rel = f"{w}/{f.name}"
            splits[2 if rel in test else 1 if rel in val else 0].append((f, i))
    return splits[0], splits[1], splits[2], words


def load_label_folders(root: str | Path, labels: list[str] | None = None) -> tuple[list, list[str]]:
    """Generic ``root/<label>/*.wav``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"audio folder not found: {root}")
    labels = list(labels) if labels else sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [(f, i) for i, lab in enumerate(labels) for f in sorted((root / lab).glob("*.wav"))]
    if not items:
        raise DataError(f"no .wav files under {root}/<label>/")
    return items, labels


def asterisk_words(root: str | Path = ASTERISK_DIR, words: list[str] = DIGIT_WORDS,
                   subdir: str = "digits") -> tuple[list, list[str]]:
    """Asterisk prompt recordings (``asterisk-core-sounds-en-wav``): the file name is the word."""
    folder = Path(root) / subdir
    items = []
    for i, w in enumerate(words):
        f = folder / f"{w}.wav"
        if not f.is_file():
            raise DataError(f"{f} not found (install the Debian package asterisk-core-sounds-en-wav)")
        items.append((f, i))
    return items, list(words)


ASTERISK_SOUNDS = "/usr/share/asterisk/sounds"
ASTERISK_DOCS = "/usr/share/doc"


def asterisk_transcripts(lang: str, doc_root: str | Path = ASTERISK_DOCS) -> dict[str, str]:
    """``{prompt name: transcript}`` from ``asterisk-core-sounds-<lang>``'s ``core-sounds-<lang>.txt.gz``
    (``name: text`` lines; ``;`` comments; names may hold a subfolder, e.g. ``digits/1``)."""
    import gzip

    f = Path(doc_root) / f"asterisk-core-sounds-{lang}" / f"core-sounds-{lang}.txt.gz"
    if not f.is_file():
        raise DataError(f"{f} not found (install the Debian package asterisk-core-sounds-{lang})")
    try:
        text = gzip.decompress(f.read_bytes()).decode("utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{f}: unreadable transcript file ({e})") from None
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";") or ":" not in line:
            continue
        name, _, tr = line.partition(":")
        name, tr = name.strip(), tr.strip()
        if name and tr and " " not in name:
            out[name] = tr
    return out


def asterisk_voice_dir(lang: str, root: str | Path = ASTERISK_SOUNDS) -> Path:
    """The folder of one language's recordings (e.g. ``en_US_f_Allison`` for ``en``)."""
    root = Path(root)
    cands = sorted(d for d in root.glob(f"{lang}_*") if d.is_dir() and not d.is_symlink()) if root.is_dir() else []
    if not cands:
        raise DataError(f"no recordings for language {lang!r} under {root} "
                        f"(install the Debian package asterisk-core-sounds-{lang}-wav)")
    return cands[0]


def asterisk_prompts(lang: str, root: str | Path = ASTERISK_SOUNDS, doc_root: str | Path = ASTERISK_DOCS,
                     spoken_only: bool = True) -> list[tuple[Path, str]]:
    """``(wav path, transcript)`` of every prompt that has both a recording and a transcript,
    sorted by name. ``spoken_only`` drops non-speech entries (``[beep tone]``, ``(silence)`` transcripts)."""
    voice, tr = asterisk_voice_dir(lang, root), asterisk_transcripts(lang, doc_root)
    items = []
    for name in sorted(tr):
        text = tr[name]
        if spoken_only and text.startswith(("[", "(")):  # "[beep tone]", "(1 second of silence)"
            continue
        f = voice / f"{name}.wav"
        if f.is_file():
            items.append((f, text))
    if not items:
        raise DataError(f"no {lang!r} recording under {voice} matches a transcript")
    return items


LID_LANGUAGES = ("en", "es", "fr", "it", "ru")


def split_names(names: list[str], sizes: dict[str, int | None], seed: int, what: str = "prompts") -> dict[str, list[str]]:
    """A seeded permutation of distinct ``names`` cut into ``sizes`` (in the order given; a
    size of None takes the rest), so no name is in two splits."""
    names = sorted(names)
    if len(set(names)) != len(names):
        raise DataError(f"{what}: duplicate names")
    fixed = sum(int(v) for v in sizes.values() if v is not None)
    if any(v is not None and int(v) < 0 for v in sizes.values()):
        raise DataError(f"{what}: split sizes must be >= 0, got {sizes}")
    if fixed > len(names):
        raise DataError(f"{what}: {len(names)} available, the splits ask for {fixed} ({sizes})")
    perm = np.random.default_rng(seed).permutation(len(names))
    out, at = {}, 0
    for split, n in sizes.items():
        n = len(names) - fixed if n is None else int(n)
        out[split] = [names[i] for i in perm[at:at + n]]
        at += n
    return out


def asterisk_lid(languages: list[str] = LID_LANGUAGES, sizes: dict[str, int | None] | None = None, seed: int = 0,
                 root: str | Path = ASTERISK_SOUNDS, doc_root: str | Path = ASTERISK_DOCS) -> tuple[dict, list[str]]:
    """Spoken-language identification from the Asterisk prompts: ``({split: [(wav, label)]}, languages)``.
    Each language's prompts are split by a seeded permutation of their names (seed mixed with
    the language code, so a language's split does not depend on the others listed): a recording
    is in one split only. One voice per language: the label also names the speaker."""
    import zlib

    sizes = dict(sizes or {"test": 50, "train": 40})
    languages = list(languages)
    if not languages or len(set(languages)) != len(languages):
        raise DataError(f"asterisk_lid needs distinct languages, got {languages}")
    out: dict[str, list] = {s: [] for s in sizes}
    for li, lang in enumerate(languages):
        pairs = asterisk_prompts(lang, root, doc_root)
        voice = asterisk_voice_dir(lang, root)
        items = {str(p.relative_to(voice).with_suffix("")): p for p, _ in pairs}
        parts = split_names(list(items), sizes, seed * 1_000_003 + zlib.crc32(lang.encode()), f"language {lang!r}")
        for split, names in parts.items():
            out[split].extend((items[n], li) for n in names)
    return out, languages


# spoken-word categories of the Asterisk prompts: (class, prompt-name pattern); the pattern is
# the same in every language's folder (digits/7 is "seven", "sette", "семь", ...)
WORD_CLASSES = (("number", r"digits/\d+"), ("ordinal", r"digits/h-\d+"), ("calendar", r"digits/(?:day|mon)-\d+"),
                ("letter", r"letters/[a-z]"), ("phonetic", r"phonetic/[a-z]_p"))


def asterisk_word_classes(languages: list[str] = LID_LANGUAGES, test_fraction: float = 0.4, seed: int = 0,
                          root: str | Path = ASTERISK_SOUNDS,
                          doc_root: str | Path = ASTERISK_DOCS) -> tuple[dict, list[str]]:
    """Spoken-word category from the Asterisk prompts of ``languages``: a number (digits/0 ...
    digits/90), an ordinal (digits/h-N), a weekday or month name (digits/day-N, digits/mon-N),
    a letter (letters/a ... z) or a spelling-alphabet word (phonetic/a_p: alpha, "a come
    ancona", ...). ``({"train": [...], "test": [...]}, classes)``.

    The split is by prompt *name* across languages: per class a seeded permutation of the
    names found in any of the languages puts round(test_fraction x n) names in test, and a
    test name is test in every language, so no test word is heard in training in any language
    (and no recording is in two splits). Every class is read by every language's voice, so the
    voice says nothing about the class."""
    import re

    languages = list(languages)
    if not languages or len(set(languages)) != len(languages):
        raise DataError(f"asterisk_word_classes needs distinct languages, got {languages}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pats = [(c, re.compile(p + r"$")) for c, p in WORD_CLASSES]
    found: dict[str, dict[str, Path]] = {}  # name -> {language: wav}
    for lang in languages:
        voice = asterisk_voice_dir(lang, root)
        for p, _ in asterisk_prompts(lang, root, doc_root):
            name = p.relative_to(voice).with_suffix("").as_posix()
            if any(rx.match(name) for _, rx in pats):
                found.setdefault(name, {})[lang] = p
    out: dict[str, list] = {"train": [], "test": []}
    for ci, (cls, rx) in enumerate(pats):
        names = sorted(n for n in found if rx.match(n))
        if len(names) < 2:
            raise DataError(f"word class {cls!r}: {len(names)} prompt names under {root} for {languages} "
                            "(need 2: one for each split)")
        n_test = min(len(names) - 1, max(1, round(float(test_fraction) * len(names))))
        parts = split_names(names, {"test": n_test, "train": None}, seed * 1_000_003 + ci, f"word class {cls!r}")
        for split, ns in parts.items():
            out[split].extend((found[n][lang], ci) for n in ns for lang in languages if lang in found[n])
    return out, [c for c, _ in WORD_CLASSES]
