"""Training: data loading, the classifier recipe, evaluation, and saving artifacts."""
