"""Hugging Face checkpoints and transformers models on qmoe (work in progress in this commit series)."""
