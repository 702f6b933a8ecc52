"""Unlearning: the shared trainer, the methods (`methods/`), the null-space projector, original
representations and the diagnostics computed after training."""
