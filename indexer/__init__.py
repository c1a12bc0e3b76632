"""Indexer: the HNSW index of catalog vectors and the service that answers queries from it."""
