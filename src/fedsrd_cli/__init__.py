"""fedsrd: federated LoRA fine-tuning with FedSRD, one safetensors file at a time."""

__version__ = "0.1.0"
