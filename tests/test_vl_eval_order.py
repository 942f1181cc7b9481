"""Evaluation batches go by input length (fewer pad tokens); the predictions are those of the file
order, example by example, on a causal and a seq2seq model."""

import dataclasses

import numpy as np
import pytest
import torch

from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer
from adapterkit.vl.data import TaskData


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("vlorder") / "data", n_images=24)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-bart"])
def test_length_order_keeps_every_prediction(fixture_dir, tmp_path, monkeypatch, backbone):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {"model": {"backbone": backbone, "feat_dim": 16}, "preset": "single_adapter",
               "data": {"root": str(fixture_dir), "features": str(fixture_dir / "features")},
               "train": {"epochs": 1, "batch_size": 4, "checkpoint_every": 1000, "max_text_len": 12,
                         "max_target_len": 6},
               "eval": {"batch_size": 3, "max_new_tokens": 3, "caption_max_new_tokens": 4, "caption_beams": 1}}
        tr = Trainer(load_config(cfg), tmp_path / "run")
        for t in ("vqa", "gqa"):  # the fixture's questions are all alike: make their lengths differ
            data = tr._eval_data(t, "test")
            data.examples = [dataclasses.replace(e, text=e.text + " the object" * ((len(data) - i) % 3))
                             for i, e in enumerate(data.examples)]
        orders = {t: tr._eval_data(t, "test").eval_order() for t in tr.tasks}
        for t, order in orders.items():  # a permutation of the examples
            assert sorted(order.tolist()) == list(range(len(tr._eval_data(t, "test"))))
        assert not np.array_equal(orders["vqa"], np.arange(len(orders["vqa"])))  # the two orders differ
        by_length = {t: tr.predict(t, "test") for t in tr.tasks}
        monkeypatch.setattr(TaskData, "eval_order", lambda self: np.arange(len(self.examples)))
        file_order = {t: tr.predict(t, "test") for t in tr.tasks}
        assert by_length == file_order
        assert all(len(v) == len(tr._eval_data(t, "test")) for t, v in by_length.items())
    finally:
        torch.set_num_threads(n)
