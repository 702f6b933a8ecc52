"""Metric registrations, one module per metric name (`eval.metrics` lists them), mirroring
unlearn/methods/. The computations they call live one level up (evaluate/facts.py, muse.py,
lm_eval_bridge.py); perplexity, a few lines, computes in its own module."""
