"""VL-Adapter as its reference code (ylsung/VL_adapter) sets it up: freeze policies and the
parameter table, decoder scoring positions, task prefixes, visual inputs, lengths."""

import numpy as np
import pytest
import torch

from adapterkit.vl.build import build_vl_model, count_params


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (a shared, loaded CPU makes two threads spin, not speed up)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# % trainable of VL-BART (image setting) per preset: the paper's Table 1; multiple_lora as the
# reference code counts it (30,020,352 / 169,468,416 = 17.714%, the paper prints 17.72)
PAPER_IMAGE = {"full_finetune": 100.0, "multiple_adapters": 12.22, "half_shared_adapters": 8.36,
               "single_adapter": 4.18, "hyperformer": 5.79, "multiple_compacters": 7.05, "single_compacter": 2.70,
               "multiple_lora": 17.71, "single_lora": 5.93, "multiple_prompts": 4.53, "single_prompt": 2.00}


@pytest.mark.parametrize("preset", sorted(PAPER_IMAGE))
def test_parameter_table_matches_the_paper(preset):
    r = count_params("vl-bart", preset)
    assert round(r["percent"], 2) == PAPER_IMAGE[preset]


def test_video_single_adapter_matches_the_paper():
    assert round(count_params("vl-bart", "single_adapter", "video")["percent"], 2) == 3.39


def test_params_cli_prints_the_paper_column(capsys):
    from adapterkit.cli import main

    assert main(["params", "--model", "vl-bart", "--setting", "video", "--preset", "single_adapter"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("single_adapter"))
    assert row.split()[-2:] == ["3.39", "3.39"]  # ours, then the paper's


def _trainable_base(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("lm.")}


@pytest.mark.parametrize("preset", ["single_lora", "multiple_lora"])
def test_lora_presets_train_every_bias_and_no_layernorm_weight(preset):
    m, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 8, "corpus": ["a b"]}, preset, ["vqa", "gqa"])
    on = _trainable_base(m)
    biases = {n for n, _ in m.lm.named_parameters() if n.endswith(".bias")}
    assert biases and {f"lm.{n}" for n in biases} == on  # LayerNorm biases are biases too (as the reference)
    ln_weights = [n for n, mod in m.lm.named_modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert ln_weights and not any(f"lm.{n}.weight" in on for n in ln_weights)


@pytest.mark.parametrize("preset", ["single_prompt", "multiple_prompts"])
def test_prompt_presets_train_no_layernorm(preset):
    m, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 8, "corpus": ["a b"]}, preset, ["vqa", "gqa"])
    assert _trainable_base(m) == set()
    assert all(p.requires_grad for p in m.visual.parameters())


# --- 1. scoring at the position of the answer's first content token ----------------------------

def _tokenizer(style: str, corpus: list[str]):
    """A tokenizer trained here with the `tokenizers` library, shaped like the real ones:
    "bart": byte-level BPE, targets <s> ... </s> (ids <s>=0, <pad>=1, </s>=2 as BART);
    "t5": sentencepiece-style unigram, targets ... </s>, no BOS (<pad>=0, </s>=1 as T5); "causal": byte-level BPE, no specials."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "t5":  # a sentencepiece-style unigram model whose pieces are the corpus words
        words = sorted({w for line in corpus for w in line.split()})
        chars = sorted({c for line in corpus for c in line if not c.isspace()})
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
        pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
        tok = Tokenizer(models.Unigram(pieces, unk_id=2))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "bart":
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")


WORDS_TRUE, WORDS_FALSE = ["cat", "bird", "tree", "boat"], ["dog", "car", "fish", "road"]


def _binary_fixture(root, feat_dim=8, boxes=4, seed=0):
    """An NLVR2-shaped task (two images, true/false) whose answer the sentence decides."""
    from adapterkit.vl.datasets.base import VLExample, write_examples_jsonl
    from adapterkit.vl.features import FeatureStoreWriter

    rng = np.random.default_rng(seed)
    ids = [f"im{i}" for i in range(8)]
    w = FeatureStoreWriter(root / "features", ids, boxes, feat_dim, "float32", "fixture")
    w.write(rng.normal(size=(8, boxes, feat_dim)).astype(np.float32), np.zeros((8, boxes, 4), np.float32))
    w.finalize()
    n = 0
    for split, reps in (("train", 6), ("val", 1), ("test", 2)):
        exs = []
        for _ in range(reps):
            for word in WORDS_TRUE + WORDS_FALSE:
                a, b = rng.choice(8, 2, replace=False)
                exs.append(VLExample(f"x{n}", "nlvr", [ids[a], ids[b]], f"{word} .",
                                     ["true" if word in WORDS_TRUE else "false"]))
                n += 1
        write_examples_jsonl(root / "nlvr" / f"{split}.jsonl", exs)
    corpus = [f"nlvr: {w} . answer: {a}" for w in WORDS_TRUE + WORDS_FALSE
              for a in ("true", "false")] * 4
    return corpus + ["true", "false"] * 8


def _binary_data(tmp_path, style, backbone, preset="full_finetune"):
    from adapterkit.vl.data import TaskData, TextSpec
    from adapterkit.vl.datasets.base import read_examples_jsonl
    from adapterkit.vl.features import FeatureStore

    corpus = _binary_fixture(tmp_path)
    torch.manual_seed(0)
    model, tok = build_vl_model({"backbone": backbone, "feat_dim": 8, "tokenizer": _tokenizer(style, corpus)},
                                preset, ["nlvr"])
    store = FeatureStore.open(tmp_path / "features")
    spec = TextSpec(kind=model.kind)
    data = {split: TaskData("nlvr", read_examples_jsonl(tmp_path / "nlvr" / f"{split}.jsonl"), store, tok, spec, 2,
                            split == "train") for split in ("train", "test")}
    return model, tok, data


@pytest.mark.parametrize("style,backbone,steps", [("bart", "tiny-bart", 150), ("t5", "tiny-t5", 80),
                                                  ("causal", "tiny-llama", 80)])
def test_first_token_scoring_agrees_with_greedy_generation_after_training(tmp_path, style, backbone, steps):
    from adapterkit.vl.data import choice_first_tokens

    model, tok, data = _binary_data(tmp_path, style, backbone)
    if style == "bart":  # the decoder must read <s> before the answer: BART's targets start with it
        assert model.answer_prefix_ids == [tok.bos_token_id] == [0]
    else:
        assert model.answer_prefix_ids == []
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    train = data["train"]
    for step in range(steps):  # brief training, as the trainer's batches are built
        model.train()
        batch = train.train_batch(np.random.default_rng(step).permutation(len(train))[:16], step)
        loss = model(**batch, task_ids=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = data["test"]
    batch = test.eval_batch(np.arange(len(test)))
    batch.pop("uids")
    cand = choice_first_tokens(tok, model.kind, ["true", "false"])  # what the evaluator scores
    scores = model.first_token_scores(**batch, candidate_ids=cand, task_ids=0)
    scored = ["true" if t >= f else "false" for t, f in scores.tolist()]
    out = model.generate(**batch, task_ids=0, max_new_tokens=4, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    if style == "bart":  # greedy decoding emits <s> first: step 0 is not where the answer is predicted
        assert (out[:, :2] == torch.tensor([model.lm.config.decoder_start_token_id, tok.bos_token_id])).all()
    generated = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    gold = [e.targets[0] for e in test.examples]
    assert np.mean([g == y for g, y in zip(generated, gold)]) >= 0.75  # it learned the task
    assert set(generated) == {"true", "false"}
    assert scored == generated


@pytest.mark.parametrize("style,backbone", [("bart", "tiny-bart"), ("t5", "tiny-t5"), ("causal", "tiny-llama")])
def test_first_token_scores_are_the_teacher_forced_logits_of_the_first_answer_token(tmp_path, style, backbone):
    """At any weights: the scores equal the training forward's logits at the label position of the
    answer's first content token (BART: after <s>, T5: the first step, causal: after the prompt)."""
    from adapterkit.vl.data import choice_first_tokens

    model, tok, data = _binary_data(tmp_path, style, backbone, "single_adapter")
    model.eval()
    rows = np.arange(4)
    ev = data["test"].eval_batch(rows)
    ev.pop("uids")
    cand = choice_first_tokens(tok, model.kind, ["true", "false"])
    scores = model.first_token_scores(**ev, candidate_ids=cand, task_ids=0)
    tr = data["test"].train_batch(rows, 0)  # the same examples as training sees them
    with torch.no_grad():
        if model.kind == "seq2seq":
            embeds, mask, _ = model.build_inputs(tr["input_ids"], tr["attention_mask"], tr["vis_feats"],
                                                 tr["vis_boxes"], tr["img_order"])
            logits = model.lm(inputs_embeds=embeds, attention_mask=mask,
                              decoder_input_ids=model._shift_right(tr["labels"])).logits
            model._layout = None
            first = len(model.answer_prefix_ids)  # BART: labels are <s> true </s>, the answer is label 1
            assert (tr["labels"][:, first] == torch.tensor([cand[0] if e.targets[0] == "true" else cand[1]
                                                            for e in data["test"].examples[:4]])).all()
            ref = logits[:, first, cand]
        else:
            embeds, mask, n_prefix = model.build_inputs(tr["input_ids"], tr["attention_mask"], tr["vis_feats"],
                                                        tr["vis_boxes"], tr["img_order"])
            logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, n_prefix:]
            first = (tr["labels"] != -100).int().argmax(1)  # the answer's first label position
            ref = logits[torch.arange(4), first - 1][:, cand]
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)


# --- 3./4./5. prefixes, visual inputs, lengths ------------------------------------------------

@pytest.fixture()
def store(tmp_path):
    from adapterkit.vl.features import FeatureStore

    _binary_fixture(tmp_path)
    return FeatureStore.open(tmp_path / "features")


def _task(store, task, texts, targets=None, image_ids=None, **spec):
    from adapterkit.vl.build import word_tokenizer
    from adapterkit.vl.data import TaskData, TextSpec
    from adapterkit.vl.datasets.base import VLExample

    targets = targets or ["yes"] * len(texts)
    exs = [VLExample(f"u{i}", task, image_ids or ["im0"], t, [y]) for i, (t, y) in enumerate(zip(texts, targets))]
    tok = word_tokenizer(texts + targets + ["vqa: tvqa: nlvr: caption: answer:"])
    kind = spec.pop("kind", "seq2seq")
    return TaskData(task, exs, store, tok, TextSpec(kind=kind, **spec), 2, True)


def test_object_order_restarts_for_each_image():
    m, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 8, "corpus": ["a"]})
    img_order = torch.tensor([[0] * 36 + [1] * 36])  # NLVR2: two images of 36 grid tokens
    assert m.object_order(img_order).tolist() == [list(range(36)) * 2]
    feats, boxes = torch.randn(1, 1, 8).expand(1, 72, 8), torch.zeros(1, 72, 4)
    with torch.no_grad():
        v = m.visual_embeds(feats, boxes, img_order)[0]
        img = m.visual.img_order_embedding.weight
    # token k of image 2 differs from token k of image 1 (same feature) by the image-order embedding only
    torch.testing.assert_close(v[36:] - v[:36], (img[1] - img[0]).expand(36, -1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v[1], v[0])  # object order still tells tokens of one image apart
    single = m.object_order(torch.zeros(2, 64, dtype=torch.long))  # video: 64 frames, one "image"
    assert single.tolist() == [list(range(64))] * 2


def test_nlvr_batches_number_each_image_from_zero_and_zero_boxes_by_default(store):
    t = _task(store, "nlvr", ["the cat is here ."] * 2, ["true", "false"], image_ids=["im0", "im1"])
    b = t.train_batch(np.arange(2), 0)
    k = store.num_boxes
    assert b["img_order"].tolist() == [[0] * k + [1] * k] * 2
    assert (b["vis_boxes"] == 0).all()  # the reference feeds its CLIP grid features with all-zero boxes
    stored = _task(store, "nlvr", ["the cat is here ."] * 2, ["true", "false"], image_ids=["im0", "im1"],
                   zero_boxes=False)
    np.testing.assert_array_equal(stored.train_batch(np.arange(2), 0)["vis_boxes"][0, :k].numpy(),
                                  store.get("im0")[1])


def test_prefix_before_image_inputs_and_after_video_inputs(store):
    vqa = _task(store, "vqa", ["what is it ?"])
    assert vqa._texts(vqa.examples) == ["vqa: what is it ?"]
    tvqa = _task(store, "tvqa", ["[Q] why ? [Choices] a0: yes."])
    assert tvqa._texts(tvqa.examples) == ["[Q] why ? [Choices] a0: yes. tvqa: "]  # f"{sent} {prompt}"
    off = _task(store, "vqa", ["what is it ?"], use_prefix=False)
    assert off._texts(off.examples) == ["what is it ?"]
    gqa = _task(store, "gqa", ["what colour ?"])
    assert gqa._texts(gqa.examples) == ["gqa: what colour ?"]  # not the reference's typo "gpa: "


def test_which_presets_get_prefixes_as_the_reference_scripts():
    from adapterkit.vl.presets import get_preset, list_presets, uses_task_prefix

    image = {n for n in list_presets() if uses_task_prefix(get_preset(n))}
    assert {"single_adapter", "single_compacter", "single_lora", "single_prompt"} <= image
    assert not image & {"full_finetune", "multiple_adapters", "half_shared_adapters", "hyperformer",
                        "multiple_compacters", "multiple_lora", "multiple_prompts"}
    for n in ("full_finetune", "single_adapter", "single_lora", "single_prompt"):  # the video scripts
        assert uses_task_prefix(get_preset(n), video=True)
    assert uses_task_prefix(get_preset("full_finetune"), override=True)
    assert not uses_task_prefix(get_preset("single_adapter"), override=False)


def test_config_switch_turns_prefixes_on_and_off(tmp_path):
    from adapterkit.testing.fixtures import make_vl_fixture
    from adapterkit.train.config import load_config
    from adapterkit.train.trainer import Trainer

    root = make_vl_fixture(tmp_path / "data", n_images=12)

    def prefix(preset, switch):
        cfg = {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": preset,
               "data": {"root": str(root), "features": str(root / "features"), "tasks": ["vqa", "nlvr"],
                        "task_prefix": switch},
               "train": {"epochs": 1, "task_batch_scale": {"vqa": 1, "nlvr": 1}}}
        tr = Trainer(load_config(cfg), tmp_path / f"{preset}-{switch}")
        return tr.train_data["vqa"].prefix, tr.train_data["nlvr"].prefix

    assert prefix("single_adapter", None) == ("vqa: ", "nlvr: ")
    assert prefix("multiple_adapters", None) == ("", "")
    assert prefix("multiple_adapters", True) == ("vqa: ", "nlvr: ")
    assert prefix("single_adapter", False) == ("", "")


def test_question_lengths_as_the_reference(store):
    long = " ".join(["word"] * 60)
    vqa = _task(store, "vqa", [long], [" ".join(["yes"] * 30)])
    b = vqa.train_batch(np.arange(1), 0)
    assert b["input_ids"].shape[1] == 20  # "vqa: " + question, special tokens included, as max_length=20
    assert (b["labels"] != -100).sum() == 10  # VQA answers: 10 tokens
    nlvr = _task(store, "nlvr", [long], ["true"], image_ids=["im0", "im1"])
    b = nlvr.train_batch(np.arange(1), 0)
    assert b["input_ids"].shape[1] == 2 + 60 + 1  # "nlvr" ":" + 60 words + </s>: untruncated
    assert nlvr.eval_batch(np.arange(1))["input_ids"].shape[1] == 63
    cap = _task(store, "caption", [""], [" ".join(["yes"] * 50)])
    assert (cap.train_batch(np.arange(1), 0)["labels"] != -100).sum() == 40
    # a number in the config applies to every task
    assert _task(store, "nlvr", [long], ["true"], max_text_len=12).train_batch(np.arange(1), 0)["input_ids"].shape[1] == 12
    # fixed shapes (CUDA graphs) pad an untruncated task to its longest example
    fixed = _task(store, "nlvr", [long, "short ."], ["true", "false"], fixed_shapes=True)
    assert fixed.train_batch(np.arange(2), 0)["input_ids"].shape == (2, 63)
    # causal LMs: the text is truncated, the answer cue never is
    causal = _task(store, "vqa", [long], kind="causal")
    ids = causal.eval_batch(np.arange(1))["input_ids"][0].tolist()
    assert causal.tok.decode(ids[-2:]) == "answer :" and len(ids) == 20 + 2


def test_generation_lengths_as_the_reference():
    from adapterkit.train.config import load_config
    from adapterkit.vl.data import caption_max_new_tokens

    cfg = load_config({"preset": "single_adapter", "data": {"root": "x"}})
    assert cfg.eval.caption_max_new_tokens is None and cfg.eval.caption_beams == 5
    assert cfg.train.max_text_len is None and cfg.train.max_target_len is None
    # the reference generates with max_length 40 (image captions) / 20 (video), counting the start token
    assert caption_max_new_tokens("caption") == 39 and caption_max_new_tokens("tvc") == 19


def test_clip_backends_resize_bicubically_as_the_reference():
    from PIL import Image

    from adapterkit.vl import backends as bk

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mean, std = bk.CLIP_MEAN, bk.CLIP_STD
    # the reference: Resize((224, 224), BICUBIC) on the PIL image, ToTensor, CLIP's mean/std
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255.0
    ref = (ref - np.array(mean, np.float32)) / np.array(std, np.float32)
    ours = bk.images_to_tensor([img], 32, mean, std, "bicubic")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert not np.allclose(bk.images_to_tensor([img], 32, mean, std)[0].permute(1, 2, 0).numpy(), ref, atol=1e-3)
    with pytest.raises(bk.ConfigError, match="interpolation"):
        bk.images_to_tensor([img], 32, mean, std, "nearest")
    visual = torch.nn.Module()  # the shape of CLIP's ModifiedResNet the backend needs: a layer4
    visual.layer4 = torch.nn.Conv2d(3, 4, 1)
    rn = bk.OpenAIClipRN101Backend(clip_model=visual, resolution=32)
    np.testing.assert_allclose(rn.preprocess([img])[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tiny = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8))
    assert bk.HFVisionBackend(model=tiny, kind="clip").interpolation == "bicubic"
    assert bk.HFVisionBackend(model=tiny, kind="auto").interpolation == "bilinear"
