"""Documented configs: docs/config.md and docs/config.schema.json are what the generator writes
from the dataclasses, every run-config key has a meaning, the schema accepts the shipped configs
and refuses bad ones, YAML 1.2 numbers are numbers, other libraries' key names get a did-you-mean,
and an unknown task says so."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from adapterkit.core.config import (
    AdapterConfig,
    config_from_dict,
    describe_method,
    describe_shared_keys,
    method_entry,
    registered_methods,
)
from adapterkit.errors import ConfigError
from adapterkit.safeio import loads_yaml
from adapterkit.train import config as run_config
from adapterkit.train.config import (
    RunConfig,
    config_help_text,
    data_layout_text,
    describe_config,
    json_schema,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIGS = REPO / "examples" / "configs"
VL_CONFIGS = ["tiny.yaml", "vl_bart_paper.yaml", "vl_bart_video_paper.yaml", "vl_t5_paper.yaml"]


@pytest.fixture(scope="module")
def gen():
    return _generator()


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _leaf_keys(cls, prefix=""):
    hints = __import__("typing").get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


# --- the committed files are the generated ones ----------------------------------------------------

def test_committed_schemas_equal_the_generated_ones(gen):
    names = [n for n in gen.texts() if n.endswith(".json")]
    assert "config.schema.json" in names and {f"schema/{d}.schema.json" for d, _, _ in gen.DOMAINS} <= set(names)
    for name in names:
        committed = (DOCS / name).read_text(encoding="utf-8")
        assert committed == gen.texts()[name], f"docs/{name} is out of date: run python scripts/gen_config_docs.py"
    # the V&L branch is the V&L run config's schema (adapters by reference)
    vl = json.loads((DOCS / "config.schema.json").read_text())["definitions"]["vl"]
    want = {k: v for k, v in json_schema().items() if k not in ("$schema", "title")}
    want["properties"]["adapters"]["items"] = {"$ref": "#/definitions/adapter"}
    assert vl == json.loads(json.dumps(want))


def test_committed_config_page_equals_the_generated_one(gen):
    assert (DOCS / "config.md").read_text(encoding="utf-8") == gen.texts()["config.md"], \
        "docs/config.md is out of date: run python scripts/gen_config_docs.py"


def test_generator_check_mode_reports_a_stale_file(gen, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "DOCS", tmp_path)
    assert gen.main(["--check"]) == 1                       # nothing written yet
    assert not (tmp_path / "config.md").exists()
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    assert (tmp_path / "schema" / "rec.schema.json").is_file()
    (tmp_path / "config.md").write_text("edited by hand\n")
    assert gen.main(["--check"]) == 1
    assert "config.md" in capsys.readouterr().out
    (tmp_path / "schema" / "vision.schema.json").write_text("{}\n")
    assert gen.main(["--check"]) == 1
    assert "vision.schema.json" in capsys.readouterr().out


# --- every key documented ---------------------------------------------------------------------------

def test_every_run_config_key_is_described_with_a_default_and_a_meaning():
    rows = {r.key: r for r in describe_config()}
    assert list(rows) == _leaf_keys(RunConfig)
    for section in ("model.", "data.", "train.", "eval."):
        assert any(k.startswith(section) for k in rows)
    for key in ("preset", "adapters", "name"):
        assert key in rows
    undocumented = [k for k, r in rows.items() if not r.meaning]
    assert not undocumented, f"run config keys without help=: {undocumented}"
    assert rows["train.lr"].allowed == "> 0, <= 10"
    assert rows["train.epochs"].default == "20" and rows["eval.select_on"].allowed == "val, last"
    assert "single_lora" in rows["preset"].allowed
    assert rows["model.init_seed"].allowed == ">= 0, <= 2^63 - 1"


def test_every_method_documents_its_keys():
    shared = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert [r.key for r in describe_shared_keys()] == shared
    assert all(r.meaning for r in describe_shared_keys())
    for name in registered_methods():
        rows = describe_method(name)
        cls, _ = method_entry(name)
        own = [f.name for f in dataclasses.fields(cls) if f.name not in shared]
        assert [r.key for r in rows if r.key not in shared] == own, name
    lora = {r.key: r for r in describe_method("lora")}
    assert lora["r"].default == "8" and lora["r"].allowed == ">= 1, <= 8192" and "rank" in lora["r"].meaning
    assert lora["init"].allowed == "kaiming, gaussian, swapped"
    assert [r.key for r in describe_method("bitfit")] == ["train_biases"]  # its changed default
    assert describe_method("bitfit")[0].default == "true"
    gen = {r.key: r.meaning for r in describe_method("generative_adapter")}
    assert all(gen.values()), gen
    adamix = {r.key: r.meaning for r in describe_method("adamix")}
    assert adamix["r"].endswith("(LoRA experts)")                    # the group comment above the fields


def test_help_text_lists_every_key_and_the_data_layout():
    text = config_help_text()
    for key in _leaf_keys(RunConfig):
        assert f"  {key} (" in text, key
    for f in dataclasses.fields(AdapterConfig):
        if f.name != "method":
            assert f"  {f.name} (" in text
    assert "ROOT/<task>/<split>.jsonl" in text and "index.json" in text and "`" not in text
    assert "generative_adapter" in text
    assert max(len(line) for line in config_help_text(width=80).splitlines()) <= 80 + 40  # wrapped


def test_data_layout_documents_every_example_field(monkeypatch):
    from adapterkit.vl.datasets.base import VLExample

    text = data_layout_text()
    for f in dataclasses.fields(VLExample):
        assert f"`{f.name}` (" in text
    fields = dict(run_config.EXAMPLE_FIELDS)
    del fields["label"]
    monkeypatch.setattr(run_config, "EXAMPLE_FIELDS", fields)
    with pytest.raises(RuntimeError, match="label"):
        data_layout_text()


# --- the schema -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert jsonschema.validators.validator_for(schema) is jsonschema.Draft7Validator
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", VL_CONFIGS)
def test_schema_accepts_the_shipped_configs(validator, name):
    d = loads_yaml((CONFIGS / name).read_bytes(), what=name)
    assert [e.message for e in validator.iter_errors(d)] == []
    load_config(CONFIGS / name)  # and the loader agrees


def test_schema_accepts_every_preset_adapter_list(validator):
    from adapterkit.vl.presets import get_preset, list_presets

    for p in list_presets():
        adapters = get_preset(p)["adapters"]
        if adapters:
            assert [e.message for e in validator.iter_errors({"adapters": adapters})] == [], p
    ok = {"adapters": [{"preset": "adapterhub:seq_bn", "reduction_factor": 8}]}
    assert list(validator.iter_errors(ok)) == []


@pytest.mark.parametrize("cfg, needle", [
    ({"adapters": [{"method": "lora", "rank": 4}]}, "'rank' was unexpected"),
    ({"adapters": [{"method": "lorra"}]}, "'lorra' is not one of"),
    ({"adapters": [{"method": "lora", "r": 0}]}, "less than the minimum"),
    ({"train": {"lr": "1e-3"}}, "is not of type 'number', 'null'"),
    ({"train": {"epochs": 1.5}}, "is not of type 'integer'"),
    ({"train": {"task_batch_scale": {"vqa": 0}}}, "less than or equal to the minimum"),
    ({"eval": {"select_on": "best"}}, "is not one of"),
    ({"data": {"tasks": ["a.b"]}}, "does not match"),
    ({"data": {"sources": {"vqa": {"format": "vqa"}}}}, "'path' is a required property"),
    ({"data": {"sources": {"vqa": {"path": "x", "fromat": "vqa"}}}}, "'fromat' was unexpected"),
    ({"model": {"backbon": "tiny-bart"}}, "'backbon' was unexpected"),
    ({"preset": "single_lorra"}, "is not one of"),
])
def test_schema_refuses_what_the_loader_refuses(validator, cfg, needle):
    messages = [e.message for e in validator.iter_errors(cfg)]
    messages += [m for e in validator.iter_errors(cfg) for m in (c.message for c in (e.context or []))]
    assert any(needle in m for m in messages), messages
    base = {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_lora"}
    merged = {**base, **cfg}
    if "adapters" in cfg:
        merged.pop("preset")
    with pytest.raises(ConfigError):
        load_config(merged)


# --- YAML numbers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E5", 1e5), ("2e+2", 200.0), ("-.5", -0.5), ("1.0e-3", 1e-3), (".5E-2", 0.005),
    ("1_000.5", 1000.5), ("3", 3), ("0x1F", 31), (".inf", float("inf")),
    ('"1e-3"', "1e-3"), ("1e3x", "1e3x"), ("e3", "e3"), ("1.2.3", "1.2.3"),
])
def test_yaml_numbers_are_read_as_yaml_1_2_reads_them(text, value):
    got = loads_yaml(f"a: {text}\n", what="doc")["a"]
    assert got == value and type(got) is type(value)


def test_run_config_and_vision_config_read_exponent_floats(tmp_path):
    import yaml

    from adapterkit.vision.common import load_yaml

    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: tiny-bart, feat_dim: 16}\npreset: single_lora\n"
                 "train: {lr: 3e-4, adam_eps: 1E-8, weight_decay: 1e-2}\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.adam_eps, cfg.train.weight_decay) == (3e-4, 1e-8, 1e-2)
    assert yaml.safe_load("a: 1e-3")["a"] == "1e-3"  # PyYAML's own resolver is left as it was
    v = tmp_path / "v.yaml"
    v.write_text("lr: 1e-3\nepochs: 2\n")
    assert load_yaml(v) == {"lr": 1e-3, "epochs": 2}
    v.write_text("lr: 1\nlr: 2\n")
    with pytest.raises(ConfigError, match='the key "lr" is given twice'):
        load_yaml(v)
    v.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(v)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nowhere.yaml")


# --- did you mean -----------------------------------------------------------------------------------

@pytest.mark.parametrize("d, hint", [
    ({"method": "lora", "rank": 4}, '"rank" for method "lora" (did you mean "r"?)'),
    ({"method": "lora", "lora_alpha": 4}, '(did you mean "alpha"?)'),
    ({"method": "lora", "lora_dropout": 0.1}, '(did you mean "dropout"?)'),
    ({"method": "houlsby", "reduction": 4}, '(did you mean "reduction_factor"?)'),
    ({"method": "houlsby", "adapter_size": 64}, '(did you mean "bottleneck_dim"?)'),
    ({"method": "compacter", "rank": 2}, '(did you mean "phm_rank"?)'),
    ({"method": "generative_adapter", "rank": 2}, '(did you mean "max_rank"?)'),
    ({"method": "prefix", "num_virtual_tokens": 3}, '(did you mean "num_tokens"?)'),
    ({"method": "pfeiffer", "non_linearity": "relu"}, '(did you mean "activation"?)'),
    ({"method": "lora", "R": 4}, '(did you mean "r"?)'),
    ({"method": "lora", "alpah": 4}, '(did you mean "alpha"?)'),
])
def test_other_libraries_key_names_get_a_did_you_mean(d, hint):
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert hint in str(e.value)


def test_unknown_key_without_a_close_match_lists_the_keys():
    with pytest.raises(ConfigError, match=r'unknown key "zzz" for method "lora"; its keys: method, tasks, .*, r, alpha'):
        config_from_dict({"method": "lora", "zzz": 1})
    with pytest.raises(ConfigError, match=r'unknown key "train.learning_rate" \(did you mean "lr"\?\)'):
        load_config({"preset": "single_lora", "train": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r'unknown key "train.zzz"; expected one of: epochs, max_steps'):
        load_config({"preset": "single_lora", "train": {"zzz": 1}})
    with pytest.raises(ConfigError, match=r'adapters\[0\]: unknown key "rank" for method "lora" \(did you mean "r"'):
        load_config({"adapters": [{"method": "lora", "rank": 4}]})


# --- unknown tasks ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    from adapterkit.testing.fixtures import make_vl_fixture

    return make_vl_fixture(tmp_path_factory.mktemp("docs") / "data", n_images=12)


def _task_cfg(root, tasks, **data):
    return load_config({"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_lora",
                        "data": {"root": str(root), "features": str(root / "features"), "tasks": tasks, **data}})


def test_an_unknown_task_says_so(fixture_root):
    with pytest.raises(ConfigError) as e:
        _task_cfg(fixture_root, ["vqa", "vqaa"]).check_paths()
    msg = str(e.value)
    assert msg.startswith(f"unknown task 'vqaa': no directory {fixture_root / 'vqaa'} and no data.sources entry; "
                          "known built-in tasks: vqa, gqa, nlvr, caption, tvqa")
    assert msg.endswith('(did you mean "vqa"?)')
    assert "features" not in msg.split("task directories in")[1]  # only directories holding .jsonl files
    assert "missing dataset file" not in msg


def test_a_builtin_task_without_data_and_a_custom_task_with_a_directory(fixture_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(fixture_root, root)
    shutil.rmtree(root / "gqa")
    with pytest.raises(ConfigError, match=r"no data for task 'gqa': no directory .*gqa and no data.sources entry "
                                          r"\(write .*gqa/train.jsonl"):
        _task_cfg(root, ["vqa", "gqa"]).check_paths()
    (root / "mytask").mkdir()   # a custom task: its directory exists, so the error is the missing file
    with pytest.raises(ConfigError, match=r"missing dataset file .*mytask/train.jsonl \(task 'mytask'"):
        _task_cfg(root, ["mytask"]).check_paths()
    shutil.copy(root / "vqa" / "train.jsonl", root / "mytask" / "train.jsonl")
    rows = (root / "mytask" / "train.jsonl").read_text().replace('"task": "vqa"', '"task": "mytask"')
    (root / "mytask" / "train.jsonl").write_text(rows)
    (root / "mytask" / "val.jsonl").write_text(
        (root / "vqa" / "val.jsonl").read_text().replace('"task": "vqa"', '"task": "mytask"'))
    checked = _task_cfg(root, ["mytask"]).check_paths(("train", "val"))
    assert len(checked[("mytask", "train")]) > 0


def test_task_data_problem_is_none_for_tasks_with_data(fixture_root):
    cfg = _task_cfg(fixture_root, ["vqa", "okvqa"], sources={"okvqa": {"format": "vqa", "path": "x"}})
    assert cfg.task_data_problem("vqa") is None and cfg.task_data_problem("okvqa") is None
    assert cfg.task_data_problem("vqa2").startswith("unknown task 'vqa2'")


# --- every domain documented ------------------------------------------------------------------------

def _section_of(page: str, heading: str) -> str:
    """The text of a ``## heading`` section of the page (up to the next ``## ``)."""
    start = page.index(f"## {heading}")
    end = page.find("\n## ", start + 1)
    return page[start:end if end > 0 else None]


def _table_keys(text: str, heading: str) -> list[str]:
    """The keys of the table under ``### heading`` in ``text``."""
    start = text.index(f"### {heading}\n")
    end = text.find("\n### ", start + 1)
    block = text[start:end if end > 0 else None]
    return [line.split("`")[1] for line in block.splitlines() if line.startswith("| `")]


def test_every_domain_has_a_section_with_its_data_layout(gen):
    from adapterkit.engine.registry import DOMAINS

    page = gen.texts()["config.md"]
    assert sorted(d for d, _, _ in gen.DOMAINS) == sorted(DOMAINS)
    for d in DOMAINS:
        assert f"| `{d}` |" in _section_of(page, "Domains")
    layouts = {"Text run config": ["ROOT/<task>/<split>.jsonl", '"label": "sport"', '"target": "..."'],
               "Speech recognition run config": ['{"audio": "path.wav", "text": "..."}', "asterisk"],
               "Vision config": ["TRAIN_DIR/<class>/", "t10k-images-idx3-ubyte"],
               "Audio config": ["ROOT/meta/esc50.csv", "ROOT/<label>/*.wav", "train_copies"],
               "Recommendation config": ["behaviors.tsv", "leave-one-out"],
               "V&L run config": ["ROOT/<task>/<split>.jsonl", "index.json"]}
    for heading, needles in layouts.items():
        text = _section_of(page, heading)
        assert "data layout" in text, heading
        for n in needles:
            assert n in text.split("data layout", 1)[1], (heading, n)
    assert "```" not in _section_of(page, "Vision config")  # no docstring code block leaked in


def test_engine_and_dataclass_domains_list_every_key_with_a_meaning(gen):
    from adapterkit.audio.asr import ASRRunConfig
    from adapterkit.core.config import describe_dataclass
    from adapterkit.engine.config import EvalConfig, TrainConfig
    from adapterkit.rec.domain import RecSourceTrainConfig
    from adapterkit.text.config import TextRunConfig

    page = gen.texts()["config.md"]
    engine = _section_of(page, "Engine keys")
    assert _table_keys(engine, "train") == [f.name for f in dataclasses.fields(TrainConfig)]
    assert _table_keys(engine, "eval") == [f.name for f in dataclasses.fields(EvalConfig)]
    train, ev = gen.engine_rows()
    assert all(r.meaning for r in train + ev), [r.key for r in train + ev if not r.meaning]
    for cls, heading in ((TextRunConfig, "Text run config"), (ASRRunConfig, "Speech recognition run config")):
        text = _section_of(page, heading)
        keys = _leaf_keys(cls)
        for section in ("model", "data"):
            assert _table_keys(text, section) == [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
        assert _table_keys(text, "top level") == [k for k in keys if "." not in k]
        rows = gen.fill(describe_dataclass(cls), "text" if cls is TextRunConfig else "asr")
        assert all(r.meaning for r in rows), [r.key for r in rows if not r.meaning]
        # a meaning is one field's, not a comment above a field carried to the next ones
        assert not any(r.meaning.endswith(")") and "(auto:" in r.meaning for r in rows)
    rec = _section_of(page, "Recommendation config")
    assert "freeze_text" in _table_keys(rec, "source_train")
    assert {f.name for f in dataclasses.fields(RecSourceTrainConfig)} >= set(_table_keys(rec, "source_train"))
    asr = _section_of(page, "Speech recognition run config")
    assert _table_keys(asr, "eval") == ["batch_size", "max_new_tokens"]  # the defaults asr changes


@pytest.mark.parametrize("domain", ["vision", "audio", "rec"])
def test_dict_domains_list_every_default_key_with_a_meaning(gen, domain):
    page = gen.texts()["config.md"]
    text = _section_of(page, {"vision": "Vision config", "audio": "Audio config", "rec": "Recommendation config"}[domain])
    pl = __import__(f"adapterkit.{domain}.{'domain' if domain == 'rec' else 'pipeline'}", fromlist=["x"])
    heading = "source / target" if domain == "rec" else "data"
    assert _table_keys(text, heading) == list(pl.DATA_DEFAULTS)
    assert _table_keys(text, "model") == list(pl.MODEL_DEFAULTS)
    if domain != "rec":
        train = pl.VISION_TRAIN_DEFAULTS if domain == "vision" else pl.AUDIO_TRAIN_DEFAULTS
        assert _table_keys(text, "train") == list(train)
    top = set(_table_keys(text, "top level"))
    assert set(pl.TOP_KEYS) - {"data", "model", "train", "source_train", "target_train", "eval"} == top
    cells = [re.split(r"(?<!\\)\|", line) for line in text.splitlines() if line.startswith("| `")]
    assert cells and all(len(c) == 7 and c[5].strip() for c in cells), [c[1] for c in cells if not c[5].strip()]


def test_a_dict_key_without_a_meaning_stops_the_generator(gen, monkeypatch):
    from adapterkit.vision import pipeline

    monkeypatch.setitem(pipeline.DATA_DEFAULTS, "new_key", 3)
    with pytest.raises(RuntimeError, match=r"vision data\.new_key: no meaning"):
        gen.dict_rows("vision", "data", pipeline.DATA_DEFAULTS)


def test_classifier_train_comments_are_read_from_the_source(gen):
    comments = gen._dict_comments("adapterkit.vision.common", "TRAIN_DEFAULTS")
    assert comments["blr"] == "sgd: lr = blr * batch_size / 256"
    assert "lr" in comments and "epochs" not in comments


# --- every domain's schema --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def any_domain():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DOCS / "config.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _domain_validator(domain):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DOCS / "schema" / f"{domain}.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _messages(validator, cfg):
    errors = list(validator.iter_errors(cfg))
    return [e.message for e in errors] + [c.message for e in errors for c in (e.context or [])]


def _load(domain, cfg):
    """The domain's own config checks (what runs before any data is read)."""
    if domain == "text":
        from adapterkit.text.config import load_text_config

        return load_text_config(cfg)
    if domain == "asr":
        from adapterkit.audio.asr import load_config as asr_load

        return asr_load(cfg)
    if domain == "rec":
        from adapterkit.rec.domain import load_config as rec_load

        return rec_load(cfg)
    from adapterkit.vision.common import method_name, section, top_level

    pl = __import__(f"adapterkit.{domain}.pipeline", fromlist=["x"])
    top_level(cfg, pl.TOP_KEYS, domain)
    train = pl.VISION_TRAIN_DEFAULTS if domain == "vision" else pl.AUDIO_TRAIN_DEFAULTS
    out = {k: section(cfg.get(k), d, k) for k, d in (("data", pl.DATA_DEFAULTS), ("model", pl.MODEL_DEFAULTS),
                                                      ("train", train))}
    method = method_name(cfg, "petl_adapter" if domain == "audio" else "adaptformer")
    if domain == "audio" and method == "petl_adapter":
        from adapterkit.audio.models import PETL_DEFAULTS

        section(cfg.get("adapter"), PETL_DEFAULTS, "adapter")
    return out


SHIPPED = {"vision": ["vision_adaptformer_fmnist_5to9.yaml", "vision_efficientnet_linear_probe.yaml",
                      "vision_pretrain_fmnist_0to4.yaml"],
           "audio": ["audio_esc50_ast.yaml", "audio_petl_conformer_digits.yaml"],
           "rec": ["rec_bbc_houlsby.yaml", "rec_mind_to_amazon.yaml"]}


@pytest.mark.parametrize("domain, name", [(d, n) for d, ns in SHIPPED.items() for n in ns])
def test_schemas_accept_the_shipped_pipeline_configs(any_domain, domain, name):
    d = loads_yaml((CONFIGS / name).read_bytes(), what=name)
    assert _messages(_domain_validator(domain), d) == []          # as shipped, for adapterkit DOMAIN train
    assert _messages(any_domain, {**d, "domain": domain}) == []   # with domain:, for adapterkit train
    _load(domain, d)


@pytest.mark.parametrize("name", VL_CONFIGS)
def test_the_any_domain_schema_takes_vl_configs_without_a_domain_key(any_domain, name):
    d = loads_yaml((CONFIGS / name).read_bytes(), what=name)
    assert _messages(any_domain, d) == [] and _messages(_domain_validator("vl"), d) == []


GOOD = {
    "text": {"domain": "text", "model": {"name_or_path": "tiny-bert"}, "preset": "single_lora",
             "data": {"root": "data/text", "tasks": ["bbc"]}, "train": {"epochs": 1, "lr": 1e-3}},
    "asr": {"domain": "asr", "model": {"name_or_path": "tiny-whisper", "audio_seconds": 10.0},
            "adapters": [{"method": "houlsby", "reduction_factor": 16, "sharing": "per_task"}],
            "data": {"source": "asterisk", "tasks": ["es", "fr"], "train_per_task": 8}},
}


@pytest.mark.parametrize("domain", sorted(GOOD))
def test_schemas_accept_a_text_and_an_asr_config(any_domain, domain):
    cfg = GOOD[domain]
    assert _messages(any_domain, cfg) == [] and _messages(_domain_validator(domain), cfg) == []
    _load(domain, cfg)


@pytest.mark.parametrize("domain, cfg, needle", [
    ("text", {**GOOD["text"], "model": {"nam": "x"}}, "'nam' was unexpected"),
    ("text", {**GOOD["text"], "adapters": [{"method": "lora", "rank": 4}]}, "is valid under each of"),
    ("text", {k: v for k, v in GOOD["text"].items() if k != "preset"}, "is not valid under any of"),
    ("text", {**GOOD["text"], "data": {"tasks": ["a.b"]}}, "does not match"),
    ("text", {**GOOD["text"], "train": {"optimizer": "adam"}}, "is not one of"),
    ("asr", {**GOOD["asr"], "adapters": [{"method": "lora", "rank": 4}]}, "'rank' was unexpected"),
    ("asr", {**GOOD["asr"], "model": {"audio_seconds": 60}}, "greater than the maximum"),
    ("vision", {"domain": "vision", "data": {"sourc": "fashion_mnist"}}, "'sourc' was unexpected"),
    ("vision", {"domain": "vision", "train": {"epochs": "3"}}, "is not of type 'integer'"),
    ("vision", {"domain": "vision", "trian": {}}, "'trian' was unexpected"),
    ("audio", {"domain": "audio", "adapter": {"reduction": 4}}, "'reduction' was unexpected"),
    ("audio", {"domain": "audio", "data": {"train_copies": 1.5}}, "is not of type 'integer'"),
    ("rec", {"domain": "rec", "target": {"source": "bbc"}, "method": "lorra"}, "is not one of"),
    ("rec", {"domain": "rec"}, "'target' is a required property"),
    ("rec", {"domain": "rec", "target": {"source": "bbc"}, "target_train": {"lr": 0}}, "less than or equal to"),
])
def test_domain_schemas_refuse_what_the_loaders_refuse(any_domain, domain, cfg, needle):
    assert any(needle in m for m in _messages(any_domain, cfg)), _messages(any_domain, cfg)
    assert any(needle in m for m in _messages(_domain_validator(domain), cfg))
    with pytest.raises(ConfigError):
        _load(domain, cfg)


def test_the_schema_refuses_an_unknown_domain(any_domain):
    from adapterkit.engine.registry import domain_of

    assert any("'txt' is not one of" in m for m in _messages(any_domain, {"domain": "txt"}))
    with pytest.raises(ConfigError, match='did you mean "text"'):
        domain_of({"domain": "txt"})


def test_a_schema_with_the_petl_keys_only_for_petl_adapter(any_domain):
    assert _messages(any_domain, {"domain": "audio", "method": "lora", "adapter": {"r": 4}}) == []
    assert _messages(any_domain, {"domain": "audio", "adapter": {"reduction_rate": 16}}) == []
