"""Differential privacy (docs/privacy.md): accounting, the ledger every file carries, secret
randomness, DP-SGD at a site and the organisation-level mechanism at the coordinator.

May import math/ and the small modules at the top, nothing else of ours. Importing
this package imports nothing heavy; Opacus is imported by the functions that need it.
"""
