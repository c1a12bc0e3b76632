"""The local Kafka + Redis stack for development, the demo and CI."""

from control.stack.local import KafkaBroker, LocalStack, RedisServer

__all__ = ["KafkaBroker", "LocalStack", "RedisServer"]
