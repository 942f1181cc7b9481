"""ADAPTERKIT_NO_PROGRESS=1 silences Hugging Face's own progress bars (model loading, GGUF)."""

import os
import subprocess
import sys

import pytest

from adapterkit.engine.engine import quiet_hf_progress

_PROBE = ("from adapterkit.engine.engine import quiet_hf_progress; quiet_hf_progress(); "
          "import transformers.utils.logging as l; print(l.is_progress_bar_enabled())")


@pytest.mark.parametrize("flag, enabled", [("1", "False"), ("", "True")])
def test_before_transformers_is_imported(flag, enabled):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["ADAPTERKIT_NO_PROGRESS"] = flag
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == enabled


def test_after_transformers_is_imported(monkeypatch):
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tl

    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # restored after the test
    import tqdm.std

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__dict__["__init__"])
    tl.enable_progress_bar()
    hub.enable_progress_bars()
    try:
        quiet_hf_progress()
        assert not tl.is_progress_bar_enabled()
        assert hub.are_progress_bars_disabled()
    finally:
        tl.enable_progress_bar()
        hub.enable_progress_bars()


_BARE = ("import tqdm.auto, subprocess, sys; from adapterkit.engine.engine import quiet_hf_progress; "
         "quiet_hf_progress(); from tqdm.auto import tqdm; "
         "print(tqdm(range(2)).disable, tqdm(range(2), disable=False).disable); "
         "child = 'from tqdm.auto import tqdm; print(tqdm(range(2)).disable)'; "
         "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip())")


@pytest.mark.parametrize("flag, expected", [("1", ["True False", "True"]), ("", ["False False", "False"])])
def test_bare_tqdm_bars(flag, expected):
    """transformers' GGUF loader calls tqdm itself: quiet in this process (tqdm already imported)
    and in the processes it starts (compare workers); an explicit disable=False still shows."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["ADAPTERKIT_NO_PROGRESS"] = flag
    out = subprocess.run([sys.executable, "-c", _BARE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-2:] == expected
