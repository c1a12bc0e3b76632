"""The face of Lookalike: the `lookalike` command line, the demo, the local stack and the
local services runner. It may import every package; no service and nothing in the core
imports it."""
