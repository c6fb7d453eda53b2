"""The hospital role: ClientApp and the resident site runtime."""
