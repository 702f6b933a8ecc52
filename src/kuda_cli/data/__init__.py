"""Data: knowledge sets, text corpora and question sets (built-in files, local paths, the hub).

What a kind of data option gives the stages (texts, probes, the evaluation that fits it) is the
kind's own: `kuda_cli.data.kinds`, one module per kind."""
