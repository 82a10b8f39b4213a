"""Any causal LM from from_pretrained: tiny random GPT-2 and Llama checkpoints this file saves
itself, loaded back through model.name_or_path=<dir>; freezing and dropout per family (the table
of harness/backends/families.py); knobs a family outside the table lacks, refused before any
trial; chat rows through the tokenizer's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.backends.batching import batches
from harness.backends.families import FAMILIES, build_model, freeze, max_positions
from harness.backends.local import LocalBackend
from harness.config import ConfigError, with_params
from harness.data import load_dataset
from harness.study import plan_study
from tests.helpers import ROOT, RecordingReporter, trial_spec

GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "real" / "gpt2_tokenizer_tiny_gpt2"
# A small chat template in the ChatML style (Qwen, SmolLM2): an end-of-turn marker after each
# message, then a newline; the assistant header as the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# a few steps: these tests check that the path works, not that the models learn
SHORT = {
    "train.epochs": 1,
    "train.max_steps": 3,
    "train.batch_size": 8,
    "train.max_length": 48,
    "train.max_new_tokens": 3,
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)  # the shared data folder


def tiny_config(family: str, vocab_size: int):
    """A tiny random config of ``family`` (gpt2, llama, or another transformers model_type)."""
    from transformers import AutoConfig, GPT2Config

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "vocab_size": vocab_size,
    }
    if family != "opt":
        shape["num_key_value_heads"] = 2
    else:  # OPT names its shape its own way
        shape |= {"ffn_dim": 64, "word_embed_proj_dim": 32}
    return AutoConfig.for_model(family, **shape)


def save_checkpoint(directory: Path, family: str, tokenizer, chat_template: str | None = None):
    """A tiny random causal LM of ``family`` with the tokenizer beside it, as save_pretrained
    writes a Hub checkpoint."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer))).save_pretrained(directory)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    tokenizer.chat_template = None
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """family -> a saved tiny checkpoint; the Llama one's tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "gpt2": save_checkpoint(root / "gpt2", "gpt2", tokenizer),
        "llama": save_checkpoint(root / "llama", "llama", tokenizer, CHAT_TEMPLATE),
    }


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names_under(model, *prefixes: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


# --- freezing and dropout go through the table ---------------------------------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_table_names_settings_each_family_config_has(model_type):
    """A misspelt dropout setting would be stored in the config and change nothing."""
    from transformers import AutoConfig

    settings = AutoConfig.for_model(model_type).to_dict()
    family = FAMILIES[model_type]
    assert set(family.dropout) <= set(settings)
    assert isinstance(settings[family.positions], int)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"])
@pytest.mark.parametrize("head", ["AutoModelForSequenceClassification", "AutoModelForCausalLM"])
def test_freezing_trains_the_last_blocks_the_final_norm_and_the_head(family, head):
    import transformers

    config = tiny_config(family, 100)
    config.pad_token_id = 0
    model = getattr(transformers, head).from_config(config)
    every = {name for name, _ in model.named_parameters()}
    parts = FAMILIES[family]
    blocks, norm = parts.blocks + ".", parts.final_norm + "."
    # the head: the classification head is `score`; the LM head is its own matrix (Llama), or
    # the embedding matrix (tied, GPT-2 and Gemma: named_parameters lists it once, as wte or
    # embed_tokens, which then trains too)
    if head == "AutoModelForSequenceClassification":
        heads = names_under(model, "score.")
    else:
        heads = {name for name, p in model.named_parameters() if p is model.lm_head.weight}
        tied = {"gpt2": {"transformer.wte.weight"}, "gemma": {"model.embed_tokens.weight"}}
        assert heads == tied.get(family, {"lm_head.weight"})

    freeze(model, 0)
    assert trainable(model) == names_under(model, norm) | heads
    assert names_under(model, blocks) and not names_under(model, blocks) & trainable(model)
    freeze(model, 1)
    assert trainable(model) == names_under(model, f"{blocks}1.", norm) | heads
    freeze(model, 2)
    assert trainable(model) == names_under(model, blocks, norm) | heads
    fresh = getattr(transformers, head).from_config(config)
    freeze(fresh, -1)
    assert trainable(fresh) == every


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_a_checkpoint_loads_with_the_family_dropout_and_the_task_head(
    make_cfg, checkpoints, family, study
):
    cfg = with_params(
        make_cfg(f"study={study}", f"model.name_or_path={checkpoints[family]}"),
        {"train.dropout": 0.25},
    )
    prepared = LocalBackend().prepare(cfg, load_dataset(cfg.data))
    model = build_model(cfg, prepared)
    assert model.config.model_type == family
    for name in FAMILIES[family].dropout:
        assert getattr(model.config, name) == 0.25
    assert model.config.pad_token_id == prepared.pad_id
    assert max_positions(model) == 128
    if study == "sentiment_tiny":
        assert type(model).__name__.endswith("ForSequenceClassification")
        assert model.score.out_features == len(prepared.labels) == 3
    else:
        assert not hasattr(model, "score")
        assert model.lm_head.out_features == len(prepared.tokenizer)


def test_a_checkpoint_saved_in_bf16_trains_in_fp32(make_cfg, tokenizer, tmp_path):
    """transformers keeps a checkpoint's saved dtype; AdamW on bf16 weights would round small
    updates away (and a CPU trial would run in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "bf16"
    save_checkpoint(directory, "llama", tokenizer)
    AutoModelForCausalLM.from_pretrained(directory).to(torch.bfloat16).save_pretrained(directory)
    cfg = make_cfg(f"model.name_or_path={directory}")
    model = build_model(cfg, LocalBackend().prepare(cfg, load_dataset(cfg.data)))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_more_trainable_blocks_than_the_model_has_trains_them_all():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", 100))
    freeze(model, 5)  # 2 blocks
    assert all(p.requires_grad for p in model.model.layers.parameters())


def test_a_llama_is_built_from_scratch_with_model_tiny_llama(make_cfg):
    cfg = with_params(make_cfg("model=tiny_llama"), {"train.dropout": 0.2})
    model = build_model(cfg, LocalBackend().prepare(cfg, load_dataset(cfg.data)))
    config = model.config
    assert type(model).__name__ == "LlamaForSequenceClassification"
    m = cfg.model
    assert (config.num_hidden_layers, config.num_attention_heads) == (m.n_layer, m.n_head)
    assert (config.hidden_size, config.intermediate_size) == (m.n_embd, 4 * m.n_embd)
    assert config.max_position_embeddings == m.n_positions == max_positions(model)
    assert config.attention_dropout == 0.2


def test_max_length_beyond_a_llama_checkpoint_positions_is_a_clear_error(
    make_cfg, checkpoints, tmp_path
):
    cfg = with_params(
        make_cfg(f"model.name_or_path={checkpoints['llama']}"), {"train.max_length": 256}
    )
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    with pytest.raises(ValueError, match=r"train.max_length=256 exceeds the model's 128"):
        backend.run(trial_spec(cfg, prepared, tmp_path), RecordingReporter("eval/f1"))


# --- trials on the checkpoints ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_a_short_trial_on_a_saved_checkpoint(make_cfg, checkpoints, tmp_path, family, study):
    cfg = with_params(
        make_cfg(f"study={study}", f"model.name_or_path={checkpoints[family]}"),
        {**SHORT, "train.trainable_blocks": 1, "train.dropout": 0.05},
    )
    backend = LocalBackend()
    backend.check_config(cfg, frozenset())
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    assert prepared.tokenizer_source == str(checkpoints[family])
    result = backend.run(
        trial_spec(cfg, prepared, tmp_path, save_model=True), RecordingReporter(cfg.sweep.metric)
    )
    assert result.steps == 3
    assert cfg.sweep.metric in result.metrics
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["model_type"] == family
    assert all(saved[name] == 0.05 for name in FAMILIES[family].dropout)


@pytest.mark.slow
@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_a_short_trial_of_the_tiny_llama_from_scratch(make_cfg, tmp_path, study):
    cfg = with_params(make_cfg(f"study={study}", "model=tiny_llama"), SHORT)
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    result = backend.run(
        trial_spec(cfg, prepared, tmp_path, save_model=True), RecordingReporter(cfg.sweep.metric)
    )
    assert result.steps == 3 and cfg.sweep.metric in result.metrics
    assert json.loads((result.model_dir / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_a_checkpoint_outside_the_table_trains_with_the_default_knobs(
    make_cfg, tokenizer, tmp_path
):
    checkpoint = save_checkpoint(tmp_path / "opt", "opt", tokenizer)
    cfg = with_params(make_cfg(f"model.name_or_path={checkpoint}", "search=none"), SHORT)
    plan = plan_study(cfg)  # train.dropout and train.trainable_blocks at their defaults
    prepared = plan.backend.prepare(plan.cfg, plan.dataset)
    result = plan.backend.run(
        trial_spec(plan.cfg, prepared, tmp_path / "run"), RecordingReporter("eval/f1")
    )
    assert result.steps == 3 and "eval/f1" in result.metrics


# --- knobs checked before any trial ------------------------------------------------------------


@pytest.fixture
def opt_config(tmp_path, tokenizer) -> Path:
    """A checkpoint of a family outside the table: its config alone is all the checks read."""
    directory = tmp_path / "tiny-opt"
    tiny_config("opt", len(tokenizer)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("override", "key", "how"),
    [
        ("train.dropout=0.2", "train.dropout", "set to 0.2"),
        ("train.trainable_blocks=1", "train.trainable_blocks", "set to 1"),
        ("train.trainable_blocks=choice(-1,0,1)", "train.trainable_blocks", "searched"),
        ("train.dropout=interval(0.0,0.3)", "train.dropout", "searched"),
    ],
)
def test_a_knob_the_loaded_architecture_lacks_is_refused_before_any_trial(
    make_cfg, opt_config, override, key, how
):
    cfg = make_cfg(f"model.name_or_path={opt_config}", "search=none", override)
    with pytest.raises(ConfigError) as error:
        plan_study(cfg)
    message = str(error.value)
    assert f"{key} is {how}" in message
    assert "is a opt model" in message and str(opt_config) in message
    assert "remove" in message and "gpt2, llama" in message


def test_a_family_outside_the_table_with_default_knobs_passes_the_checks(make_cfg, opt_config):
    LocalBackend().check_config(make_cfg(f"model.name_or_path={opt_config}"), frozenset())


def test_the_default_search_space_is_refused_for_a_family_outside_the_table(make_cfg, opt_config):
    """The default space searches dropout and frozen blocks: the user learns it at once."""
    with pytest.raises(ConfigError, match=r"train.dropout is searched.*opt model"):
        plan_study(make_cfg(f"model.name_or_path={opt_config}"))


def test_a_checkpoint_whose_config_cannot_be_read_is_a_config_error(make_cfg, tmp_path):
    cfg = make_cfg(f"model.name_or_path={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*missing: cannot read its config"):
        LocalBackend().check_config(cfg, frozenset())


def test_an_architecture_we_cannot_build_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"model.architecture=mamba .*gpt2, llama"):
        plan_study(make_cfg("model.architecture=mamba"))


# --- chat rows through the chat template -------------------------------------------------------


def test_chat_rows_go_through_the_tokenizer_chat_template(make_cfg, checkpoints, tokenizer):
    cfg = make_cfg("study=faq_chat_tiny", f"model.name_or_path={checkpoints['llama']}")
    prepared = LocalBackend().prepare(cfg, load_dataset(cfg.data))
    template = prepared.tokenizer
    assert template.chat_template == CHAT_TEMPLATE
    eos = template.eos_token_id
    split = prepared.train
    for ids, completion, example in zip(split.inputs, split.targets, split.examples, strict=True):
        history = list(example.messages[:-1])
        expected = template.apply_chat_template(
            history, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert ids == list(expected)
        # the answer as the template writes it: content, then its end-of-turn marker (EOS here),
        # without the newline the template puts between turns
        answer = example.messages[-1]["content"]
        assert completion == [*tokenizer(answer, add_special_tokens=False)["input_ids"], eos]
        assert completion.count(eos) == 1

    # the loop learns the completion only: labels are -100 on every prompt token
    batch = next(batches(split, [[0]], 512, prepared.pad_id, "generation", _cpu()))
    labels = batch["labels"][0].tolist()
    n_prompt = len(split.inputs[0])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == split.targets[0]
    assert batch["input_ids"][0].tolist() == split.inputs[0] + split.targets[0]


def test_without_a_chat_template_chat_rows_keep_the_plain_prompt(make_cfg, checkpoints, tokenizer):
    cfg = make_cfg("study=faq_chat_tiny", f"model.name_or_path={checkpoints['gpt2']}")
    prepared = LocalBackend().prepare(cfg, load_dataset(cfg.data))
    assert not prepared.tokenizer.chat_template
    example = prepared.train.examples[0]
    assert example.messages  # a chat row, read as "role: content" lines (harness.data)
    assert (
        prepared.train.inputs[0] == tokenizer(example.text, add_special_tokens=False)["input_ids"]
    )
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    assert prepared.train.targets[0] == [*target, tokenizer.eos_token_id]


def _cpu():
    import torch

    return torch.device("cpu")
