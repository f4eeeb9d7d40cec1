"""eplbctl: the operator's tool for expert-parallel load balancing of MoE models."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
