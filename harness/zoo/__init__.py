"""Built-in models (PIDNet-S, FastBEV, BEVFusion camera branch, CenterPoint SCN)."""
