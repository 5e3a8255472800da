"""Task adapters: pre/post-processing and metric glue per task."""
