"""Causal tracing (ROME-style): probes, the tracing itself (fast and naive), layer selection and
plots. Knows nothing about Hydra or run directories: it takes a model, its adapter, a tokenizer and
plain dataclasses."""
