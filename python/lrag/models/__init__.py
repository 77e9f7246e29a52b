"""Backbones of the reference generator."""
