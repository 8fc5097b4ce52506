"""The ClientApp: train-local, sparsify and apply on each SuperNode's own base model and data."""

from fedsrd_cli.flower.apps import client_app as app

__all__ = ["app"]
