"""Audio classification with adapters (PETL for Audio Spectrogram Transformers)."""

from adapterkit.audio.data import load_esc50, load_speech_commands, read_wav
from adapterkit.audio.fbank import ast_features, kaldi_fbank
from adapterkit.audio.models import AudioClassifier, petl_config
from adapterkit.audio.pipeline import run_audio

__all__ = ["AudioClassifier", "ast_features", "kaldi_fbank", "load_esc50", "load_speech_commands", "petl_config",
           "read_wav", "run_audio"]
