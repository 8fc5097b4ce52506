"""FedSRD's math: pure torch functions over one module's tensors. No files, no models.

Imports torch and nothing else of ours but `errors` (no other folder of fedsrd_cli), so every
formula here can be read, tested against a dense reference and reused on its own.
"""
