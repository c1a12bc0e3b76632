"""The HTTP gateway: Lookalike's wire contract over HTTP, and the shopper's web page (docs/gateway.md)."""
