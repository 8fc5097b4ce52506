"""fedsrd on Flower, as a Flower App: the components point at fedsrd_cli.flower.apps."""
