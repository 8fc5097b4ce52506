"""Tests of fedsrd on Flower. Flower's telemetry and update check stay off: tests reach no network."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
