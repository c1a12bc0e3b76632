"""The local Kafka + Redis stack for development, the demo and CI."""

from lookalike.stack.local import KafkaBroker, LocalStack, RedisServer

__all__ = ["KafkaBroker", "LocalStack", "RedisServer"]
