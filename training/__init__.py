"""Training, evaluation, model registry and scheduled retraining."""
