"""Producers: the catalog feed and the query client (confluent-kafka)."""
