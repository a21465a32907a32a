"""pylb: a KV-cache-aware load balancer for fleets of vLLM replicas (DualMap routing)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pylb")
    """The installed distribution's version; `pyproject.toml`'s `version` is the one place it is written."""
except PackageNotFoundError:  # imported from a source folder that was never installed
    __version__ = "0+unknown"
