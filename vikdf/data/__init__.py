"""Readers and collators: image–text pairs for pre-training (with their stream position), dialogues for fine-tuning."""
