"""harness: hyperparameter search for fine-tuning language models.

Kept light on purpose: torch, transformers, mlflow and friends are imported where they are used.
"""

__version__ = "0.1.0"
