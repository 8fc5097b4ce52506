"""FedSRD math: pure torch functions over one module's tensors. No files, no models."""
