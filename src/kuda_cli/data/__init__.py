"""Data: knowledge sets, text corpora and question sets (built-in files, local paths, the hub)."""
