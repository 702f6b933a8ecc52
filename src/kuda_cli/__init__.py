"""kuda: knowledge unlearning experiments (KUDA and its baselines), a Hydra command-line runner."""

__version__ = "0.1.0"
