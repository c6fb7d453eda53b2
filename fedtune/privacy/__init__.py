"""Differential privacy: accounting (Opacus's accountants, noise planning) and DP-SGD."""
