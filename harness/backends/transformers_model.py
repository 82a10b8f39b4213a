"""A model the local backend saved (transformers format) logged as an MLflow transformers model
in its trial's run, registered when a name is given."""

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

    mlflow.set_tracking_uri(destination.tracking_uri)
    is_classification = task == "classification"
    auto = AutoModelForSequenceClassification if is_classification else AutoModelForCausalLM
    components = {
        "model": auto.from_pretrained(model_dir),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    # Explicit requirements: inference would add torchvision and fail, and it is slow (FACTS.md).
    requirements = [f"{name}=={version}" for name, version in _versions().items()]
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
    )
    if registered_name and info.registered_model_version is not None:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return str(info.model_uri)


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {n: metadata.version(n) for n in ("torch", "transformers", "tokenizers", "mlflow")}
