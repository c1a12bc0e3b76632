"""Lookalike: a streaming visual-similarity recommender on Kafka."""

__version__ = "0.1.0"
