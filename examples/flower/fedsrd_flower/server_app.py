"""The ServerApp: FedSRDStrategy over the run config ([tool.flwr.app.config] in pyproject.toml)."""

from fedsrd_cli.flower.apps import server_app as app

__all__ = ["app"]
