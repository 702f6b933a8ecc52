"""Data: knowledge sets, text corpora and question sets, from built-in files, local paths or the hub."""
