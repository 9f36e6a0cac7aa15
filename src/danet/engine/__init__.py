"""Training, evaluation and metrics (uses danet.models and danet.data)."""
