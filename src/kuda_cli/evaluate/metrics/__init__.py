"""The metrics, one module each (`eval.metrics` lists them), registered as unlearn/methods/ are
(kuda_cli.evaluate says what a metric owns). The computations they call live one level up
(evaluate/fact_scoring.py, muse_scoring.py, lm_eval_bridge.py); perplexity, a few lines, computes
in its own module."""
