"""A model the local backend saved (transformers format) logged as an MLflow transformers model
in its trial's run, registered when a name is given.

A saved LoRA adapter is logged as MLflow's transformers flavour logs a PEFT model: the adapter
alone (its `peft/` folder; MLmodel's `peft_adaptor`), the base named (MLmodel's
`source_model_name`; the run's tag harness.base_model), and its weights not copied: a Hub id is
recorded with its commit, a local directory by its path (`local_base_model_path`). A local base
logged any other way would be saved with the adapter's layers inside it, unloadable (MLflow 3.17).
MLflow reloads the base without the task's labels, so mlflow.transformers.load_model cannot put
a classification adapter's head back on it: load that one with PEFT
(harness.backends.adapters.load_adapted, or AutoModelForSequenceClassification.from_pretrained
(model_dir, num_labels=N)), or train with adapter.merge=true for a self-contained model."""

from __future__ import annotations

from pathlib import Path

from harness.tracking import ModelDestination


def log_transformers_model(
    destination: ModelDestination, model_dir: Path, task: str, registered_name: str | None
) -> str:
    """Logs the model saved in ``model_dir`` in ``destination``'s run; registers it when a name
    is given. Returns the model URI."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from harness.backends.adapters import adapter_base, is_adapter_dir, load_adapted

    mlflow.set_tracking_uri(destination.tracking_uri)
    is_classification = task == "classification"
    auto = AutoModelForSequenceClassification if is_classification else AutoModelForCausalLM
    adapter = is_adapter_dir(model_dir)
    components = {
        "model": load_adapted(model_dir, task) if adapter else auto.from_pretrained(model_dir),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    options: dict[str, str] = {}
    if adapter:
        base = adapter_base(model_dir)
        if Path(base).is_dir():
            options["base_model_path"] = base
        mlflow.MlflowClient(destination.tracking_uri).set_tag(
            destination.run_id, "harness.base_model", base
        )
    # Explicit requirements: inference would add torchvision and fail, and it is slow (FACTS.md).
    requirements = [f"{name}=={version}" for name, version in _versions(adapter).items()]
    # run_id (passed on to mlflow.models.Model.log), not `with mlflow.start_run(run_id=...)`:
    # leaving that block would end the run again, moving its end time (and so its duration)
    # to now, minutes after the trial ended. Without an active run the model goes to the
    # active experiment (the Default one, under ./mlruns): make it the run's.
    mlflow.set_experiment(experiment_id=destination.experiment_id)
    info = mlflow.transformers.log_model(
        transformers_model=components,
        name="model",
        task="text-classification" if is_classification else "text-generation",
        pip_requirements=requirements,
        registered_model_name=registered_name,
        run_id=destination.run_id,
        **options,
    )
    if registered_name and info.registered_model_version is not None:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return str(info.model_uri)


def _versions(adapter: bool) -> dict[str, str]:
    from importlib import metadata

    names = ("torch", "transformers", "tokenizers", "mlflow", *(("peft",) if adapter else ()))
    return {n: metadata.version(n) for n in names}
