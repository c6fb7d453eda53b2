"""The coordinator role: ServerApp, strategy wrapper, checkpoints."""
