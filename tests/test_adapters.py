"""LoRA and QLoRA through PEFT (harness/backends/adapters.py): what trains, which layers get an
adapter per family, the settings PEFT receives, the checks before any trial, a LoRA trial, and
what is saved and logged (the adapter naming its base, or the merged model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.backends.adapters import (
    apply_adapter,
    check_adapter_config,
    load_adapted,
    lora_config,
    quantization_options,
    save_adapted,
)
from harness.backends.base import UntunableKeyError
from harness.backends.local import LocalBackend
from harness.cli import main
from harness.config import ConfigError, with_params
from harness.data import load_dataset
from harness.study.plan import plan_study
from tests.helpers import RecordingReporter, save_tiny_gpt2, snapshot, trial_spec

LABELS = 3
WIDTH = 16  # hidden size of the tiny models built here


def gpt2(task: str = "classification"):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=2, num_labels=LABELS
    )
    config.pad_token_id = 0
    torch.manual_seed(0)
    return (GPT2ForSequenceClassification if task == "classification" else GPT2LMHeadModel)(config)


def llama(task: str = "classification"):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_labels=LABELS,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
    return cls(config)


def adapted_layers(model) -> set[str]:
    """The names (inside a block) of the layers that got an adapter: {"attn.c_attn", ...}."""
    return {
        ".".join(name.split(".lora_A")[0].split(".")[-2:])
        for name, _ in model.named_parameters()
        if ".lora_A." in name
    }


def nudged(model):
    """The adapter's B matrices start at zero (the adapted model is the base): move every
    trainable weight so that an adapter changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def lora_cfg(make_cfg):
    def make(*overrides: str):
        return make_cfg("adapter=lora", "search=lora_classification", *overrides)

    return make


# --- what trains, where the adapters go ------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_the_adapter_and_the_classification_head_train(lora_cfg, family):
    cfg = lora_cfg("lora.r=4", "lora.target_modules=all_linear")
    model = apply_adapter(gpt2() if family == "gpt2" else llama(), cfg, "classification")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".score." in n for n in trainable), sorted(trainable)
    assert sum(trainable.values()) == model.get_nb_trainable_parameters()[0]
    # r x (in + out) per adapted layer, and the new head: WIDTH -> LABELS
    d = WIDTH
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # GPT-2: c_attn, c_proj, c_fc, c_proj
    if family == "llama":  # q, k, v, o; gate, up (d -> 2d), down
        shapes = [(d, d)] * 4 + [(d, 2 * d), (d, 2 * d), (2 * d, d)]
    per_block = sum(4 * (i + o) for i, o in shapes)
    assert sum(trainable.values()) == 2 * per_block + d * LABELS


@pytest.mark.parametrize(
    ("family", "targets", "layers"),
    [
        ("gpt2", "attention", {"attn.c_attn", "attn.c_proj"}),
        ("gpt2", "all_linear", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
        ("llama", "attention", {f"self_attn.{p}_proj" for p in "qkvo"}),
        (
            "llama",
            "all_linear",
            {f"self_attn.{p}_proj" for p in "qkvo"}
            | {f"mlp.{p}_proj" for p in ("gate", "up", "down")},
        ),
    ],
)
def test_named_target_sets_per_family(lora_cfg, family, targets, layers):
    cfg = lora_cfg(f"lora.target_modules={targets}")
    model = apply_adapter(
        gpt2("generation") if family == "gpt2" else llama("generation"), cfg, "generation"
    )
    assert adapted_layers(model) == layers  # never the LM head, which all-linear leaves out
    config = model.peft_config["default"]
    assert config.task_type == "CAUSAL_LM"
    assert config.fan_in_fan_out is (family == "gpt2")  # GPT-2's Conv1D stores weights in x out


def test_lora_settings_reach_peft(lora_cfg):
    cfg = lora_cfg(
        "lora.r=8", "lora.alpha=32", "lora.rslora=true", "lora.dora=true", "lora.dropout=0.1"
    )
    config = lora_config(cfg, "llama", "classification")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32.0, 0.1)
    assert config.use_rslora and config.use_dora and config.task_type == "SEQ_CLS"
    assert "score" in config.modules_to_save
    model = apply_adapter(llama(), cfg, "classification")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA's magnitude


def test_adapter_none_leaves_the_model_alone(make_cfg):
    model = gpt2()
    assert apply_adapter(model, make_cfg(), "classification") is model
    assert quantization_options(make_cfg("adapter=lora")) == {}


@pytest.mark.parametrize(
    ("card_has_bf16", "precision", "compute"),
    [(True, "auto", "bfloat16"), (False, "auto", "float16"), (True, "fp16", "float16")],
)
def test_qlora_loads_the_base_in_4_bit_nf4(
    make_cfg, monkeypatch, card_has_bf16, precision, compute
):
    """Computes in the trial's precision: bf16, fp16 on a card without it (the check of a
    card's bf16 stood in for: no CUDA here)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: card_has_bf16)
    options = quantization_options(make_cfg("adapter=qlora", f"train.precision={precision}"))
    config = options["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == options["dtype"] == getattr(torch, compute)


# --- checks before any trial -----------------------------------------------------------------


def test_lora_keys_are_tunable_only_with_an_adapter(make_cfg):
    assert "lora.*" in LocalBackend().tunable_keys(make_cfg("adapter=lora"))
    with pytest.raises(UntunableKeyError, match=r"cannot tune lora\.r"):
        plan_study(make_cfg("adapter=none", "lora.r=choice(8, 16)"))


def test_trainable_blocks_with_an_adapter_is_refused(lora_cfg, make_cfg):
    # the full fine-tuning space searches train.trainable_blocks
    with pytest.raises(
        ConfigError, match=r"train\.trainable_blocks does not apply with adapter=lora"
    ):
        plan_study(make_cfg("adapter=lora"))
    with pytest.raises(ConfigError, match="leave it at -1"):
        plan_study(lora_cfg("train.trainable_blocks=1"))


def test_attention_targets_of_an_unknown_family_are_refused(lora_cfg, tmp_path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path / "neox")
    cfg = lora_cfg(f"model.name_or_path={tmp_path / 'neox'}", "lora.target_modules=attention")
    with pytest.raises(
        ConfigError, match=r"lora.target_modules=attention .*'gpt_neox'.*all_linear"
    ):
        check_adapter_config(cfg, frozenset())
    # searched: refused as soon as the space can pick it
    with pytest.raises(ConfigError, match="'gpt_neox'"):
        check_adapter_config(
            lora_cfg(f"model.name_or_path={tmp_path / 'neox'}"), frozenset({"lora.target_modules"})
        )
    check_adapter_config(with_params(cfg, {"lora.target_modules": "all_linear"}), frozenset())
    with pytest.raises(ConfigError, match=r"lora\.target_modules=mlp is not a target set"):
        check_adapter_config(with_params(cfg, {"lora.target_modules": "mlp"}), frozenset())
    searched = lora_cfg("lora.target_modules=choice(all_linear, mlp)")
    with pytest.raises(ConfigError, match=r"lora\.target_modules=mlp is not a target set"):
        check_adapter_config(searched, frozenset({"lora.target_modules"}))


def test_qlora_without_cuda_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import harness.backends.adapters as adapters

    monkeypatch.setattr(adapters, "_cuda_available", lambda: False)
    runs = tmp_path / "runs"
    code = main(["sweep", "study=sentiment_lora_tiny", "adapter=qlora", f"paths.runs_dir={runs}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "adapter=qlora" in error and "this machine has none" in error
    assert "use adapter=lora" in error and "harness[qlora]" in error
    assert snapshot(runs) == {}
    # on any machine: a trial on the CPU
    code = main(
        [
            "sweep",
            "adapter=qlora",
            "train.device=cpu",
            "search=lora_classification",
            f"paths.runs_dir={runs}",
        ]
    )
    assert code == 2 and "train.device=cpu" in capsys.readouterr().err
    assert snapshot(runs) == {}


def test_qlora_with_cuda_but_without_bitsandbytes_is_refused(make_cfg, monkeypatch):
    import importlib.util

    import harness.backends.adapters as adapters

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # as if not installed, wherever the test runs
        importlib.util,
        "find_spec",
        lambda name: None if name == "bitsandbytes" else find_spec(name),
    )
    monkeypatch.setattr(adapters, "_cuda_available", lambda: True)
    with pytest.raises(ConfigError, match=r"adapter=qlora .*needs bitsandbytes.*harness\[qlora\]"):
        adapters.check_qlora_possible(make_cfg("adapter=qlora"))


# --- saved and logged ------------------------------------------------------------------------


def test_merged_model_and_adapter_reload_with_the_adapted_models_logits(lora_cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base"
    gpt2().save_pretrained(base)
    model = nudged(
        apply_adapter(
            AutoModelForSequenceClassification.from_pretrained(base),
            lora_cfg(f"model.name_or_path={base}"),
            "classification",
        )
    )
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(
            expected, AutoModelForSequenceClassification.from_pretrained(base)(input_ids=ids).logits
        )

    tokenizer = _Tokenizer()
    save_adapted(model, tokenizer, tmp_path / "adapter", lora_cfg(f"model.name_or_path={base}"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "task_config", "tokenizer"} <= files
    assert "model.safetensors" not in files  # the base is not copied
    with torch.no_grad():
        assert torch.allclose(
            load_adapted(tmp_path / "adapter", "classification")(input_ids=ids).logits,
            expected,
            atol=1e-5,
        )

    save_adapted(
        model,
        tokenizer,
        tmp_path / "merged",
        lora_cfg(f"model.name_or_path={base}", "adapter.merge=true"),
    )
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


class _Tokenizer:
    """What save_adapted needs of a tokenizer: it saves itself."""

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "tokenizer").write_text("saved")


def test_a_model_built_from_scratch_is_saved_merged(lora_cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = nudged(apply_adapter(gpt2(), lora_cfg(), "classification"))
    save_adapted(model, _Tokenizer(), tmp_path / "model", lora_cfg())
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    assert (
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").num_labels == LABELS
    )


# --- a LoRA trial ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_trial_lowers_the_loss(lora_cfg, tmp_path):
    cfg = with_params(
        lora_cfg("model=tiny_gpt2", "train.patience=0"),
        {"train.learning_rate": 3e-3, "train.epochs": 3, "train.batch_size": 16},
    )
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter("eval/f1")
    result = backend.run(trial_spec(cfg, prepared, tmp_path, save_model=True), reporter)
    losses = [m["train/loss"] for _, m in reporter.calls if "train/loss" in m]
    epoch = len(losses) // 3
    assert sum(losses[-epoch:]) < 0.95 * sum(losses[:epoch])  # the last epoch's mean vs the first's
    evals = [m["eval/loss"] for _, m in reporter.calls if "eval/loss" in m]
    assert min(evals) < math.log(3)  # below the cross-entropy of guessing among 3 classes
    assert (result.model_dir / "model.safetensors").exists()  # from scratch: saved merged


@pytest.mark.slow
@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_a_trained_adapter_is_saved_and_logged_naming_its_base(make_cfg, tmp_path, study):
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from harness.backends.transformers_model import log_transformers_model
    from harness.tracking import ModelDestination

    dataset = load_dataset(make_cfg(f"study={study}").data)
    base = save_tiny_gpt2(make_cfg(f"study={study}"), dataset, tmp_path / "base")
    search = "lora_classification" if study == "sentiment_tiny" else "lora_generation"
    cfg = with_params(
        make_cfg(
            f"study={study}", "adapter=lora", f"search={search}", f"model.name_or_path={base}"
        ),
        {"train.epochs": 1, "train.max_new_tokens": 4, "lora.target_modules": "attention"},
    )
    backend = LocalBackend()
    result = backend.run(
        trial_spec(cfg, backend.prepare(cfg, dataset), tmp_path / "trial", save_model=True),
        RecordingReporter(str(cfg.sweep.metric)),
    )
    saved = result.model_dir
    assert (saved / "adapter_model.safetensors").exists()
    assert not (saved / "model.safetensors").exists()  # the base is not copied
    assert str(base) in (saved / "adapter_config.json").read_text()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("lora", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    task = cfg.data.task
    model_uri = log_transformers_model(
        ModelDestination(uri, experiment, run.info.run_id), saved, task, None
    )
    assert client.get_run(run.info.run_id).data.tags["harness.base_model"] == str(base)
    mlflow.set_tracking_uri(uri)
    logged = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "logged")))
    assert (logged / "peft" / "adapter_config.json").exists()
    assert not (logged / "model").exists()  # the base's weights stay where they are
    flavor = yaml.safe_load((logged / "MLmodel").read_text())["flavors"]["transformers"]
    assert flavor["peft_adaptor"] == "peft"
    assert flavor["source_model_name"] == flavor["local_base_model_path"] == str(base)
    if task == "generation":  # MLflow's own loader rebuilds the adapted model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        ids = torch.tensor([tokenizer("a question")["input_ids"]])
        loaded = mlflow.transformers.load_model(model_uri, return_type="components")["model"]
        with torch.no_grad():
            expected = load_adapted(saved, task).eval()(input_ids=ids).logits
            assert torch.allclose(loaded.eval()(input_ids=ids).logits, expected, atol=1e-5)
