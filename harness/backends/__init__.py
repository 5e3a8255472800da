"""Backends: one module per family behind one small protocol."""
