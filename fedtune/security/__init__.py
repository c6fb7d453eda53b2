"""Keys, sealed envelopes, the PKI, the coordinator's run authorization and the audit witness."""
