"""pylb: a KV-cache-aware load balancer for fleets of vLLM replicas (DualMap routing)."""

__version__ = "0.1.0"
