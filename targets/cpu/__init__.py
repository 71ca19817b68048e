"""Bit-packed CPU engine (numpy + numba, no torch)."""
