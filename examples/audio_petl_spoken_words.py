"""PETL for Audio Spectrogram Transformers: adapter configurations on spoken digits.

SMOKE TEST, NOT TRANSFER LEARNING: no pretrained AST (or any audio transformer) exists
offline, so the AST here is a random-init tiny one (3 layers, width 64) and every method
adapts random features. What it shows is that the whole chain runs on real speech and
that the configurations learn: WAV (stdlib ``wave``) -> 16 kHz -> Kaldi log-mel fbank
(128 bins, 10 ms hop, AST normalisation; torch only) -> AST -> mean-pooled tokens ->
head. With a real checkpoint use ``model: {backbone: hf, name_or_path: MIT/ast-...}``
(see examples/configs/audio_esc50_ast.yaml).

Data: the Debian package ``asterisk-core-sounds-en-wav`` (real recordings of one
speaker; the file name is the word). The ten digits 0-9 are each expanded into 24
augmented training clips and 8 differently-seeded augmented test clips (speed 0.85-1.15,
shift +-150 ms, gain +-6 dB, white noise at 5-30 dB SNR): 240 train / 80 test clips.
Test clips are new augmentations of the same recordings, so accuracy measures robustness
to those perturbations, not generalisation to new speakers.

Configurations (PETL-AST names): Pfeiffer = FFN adapter only, Houlsby = FFN + MHSA;
parallel / sequential placement; bottleneck (GELU, both projections N(0, 0.02) so both
learn) or Conformer block; LoRA on W_q, W_v (rank d/RR, scale 8/RR); prompt tuning
(VPT-deep). AdamW lr 5e-3, betas (0.9, 0.98), wd 0.1, cosine.

Run:  sudo apt-get install -y asterisk-core-sounds-en-wav; python examples/audio_petl_spoken_words.py

Measured output (2026-11-22, 2-core CPU shared with other jobs, torch 2.13):

    configuration                    test acc  trainable  % params   time
    linear probe                        21.25        650     0.53%    17s
    Pfeiffer parallel Conformer         58.75      6,826     5.32%    66s
    Houlsby parallel Conformer          53.75     12,874     9.61%   164s
    Pfeiffer parallel bottleneck        22.50      4,450     3.54%    85s
    Houlsby sequential bottleneck       16.25      8,122     6.29%    27s
    LoRA q,v (RR 8)                     23.75      6,794     5.28%     2s
    prompt tuning (VPT-deep 25)         16.25      5,450     4.28%     2s
    full fine-tuning                    20.00    122,506   100.00%     3s
    (240 train / 80 test clips, 10 classes; total 388 s)

Random-init backbone: only the ranking between configurations that learn (Conformer)
and those that barely move a random network is informative here. Times are noisy
(shared CPU, load 2-12).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml

from adapterkit.audio import run_audio

CONFIG = Path(__file__).parent / "configs" / "audio_petl_conformer_digits.yaml"
RUNS = [
    ("linear probe", "linear_probe", None),
    ("Pfeiffer parallel Conformer", "petl_adapter",
     {"adapter_type": "pfeiffer", "placement": "parallel", "block": "conformer", "reduction_rate": 8}),
    ("Houlsby parallel Conformer", "petl_adapter",
     {"adapter_type": "houlsby", "placement": "parallel", "block": "conformer", "reduction_rate": 8}),
    ("Pfeiffer parallel bottleneck", "petl_adapter",
     {"adapter_type": "pfeiffer", "placement": "parallel", "block": "bottleneck", "reduction_rate": 8}),
    ("Houlsby sequential bottleneck", "petl_adapter",
     {"adapter_type": "houlsby", "placement": "sequential", "block": "bottleneck", "reduction_rate": 8}),
    ("LoRA q,v (RR 8)", "lora", {"reduction_rate": 8}),
    ("prompt tuning (VPT-deep 25)", "prompt", None),
    ("full fine-tuning", "full", None),
]


def main() -> None:
    base = yaml.safe_load(CONFIG.read_text())
    t0 = time.time()
    print(f"{'configuration':32s} {'test acc':>8s} {'trainable':>10s} {'% params':>9s} {'time':>6s}")
    for name, method, adapter in RUNS:
        cfg = copy.deepcopy(base)
        cfg["method"], cfg["adapter"] = method, adapter
        if method == "full":
            cfg["train"] = {**cfg["train"], "lr": 5e-4}
        r = run_audio(cfg, log=lambda s: None)
        print(f"{name:32s} {r['test_acc']:8.2f} {r['trainable_params']:10,d} {r['trainable_percent']:8.2f}% "
              f"{r['train_seconds']:5.0f}s")
    print(f"({r['n_train']} train / {r['n_test']} test clips, 10 classes; total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
