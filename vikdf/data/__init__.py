"""Readers, collators and the synthetic world: image–text pairs for pre-training, dialogues for fine-tuning."""
