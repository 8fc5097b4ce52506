"""Differential privacy (docs/privacy.md): accounting, the ledger every file carries, secret
randomness, DP-SGD at a site and the organisation-level mechanism at the coordinator.

Importing this package imports nothing heavy; Opacus is imported by the functions that need it.
"""
