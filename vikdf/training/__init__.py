"""Training: arguments, the pre-training and dialogue trainers, the five objectives (paper §3.2–3.4), masking,
building a fresh VIKDF from pretrained components, the frozen-part record and trainable-only checkpoints."""
