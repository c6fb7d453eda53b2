"""LoRA: the adapter, the merge rules exact about B·A, deltas, combines, server optimizers."""
