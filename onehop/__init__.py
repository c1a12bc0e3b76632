"""An indexer that embeds its own queries: the indexer service and the worker's query stage
in one process, one Kafka hop instead of two (``LOOKALIKE_QUERY_EMBEDDING=indexer``).

A composite of two services, so it lives beside them rather than in either: services meet
only through the core (tests/unit/test_layout.py), and this package is the one place that
runs both of their stages together. ``python -m onehop`` instead of ``python -m indexer``.
"""
