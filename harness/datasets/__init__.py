"""Seeded synthetic datasets with exact labels."""
