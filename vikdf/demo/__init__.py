"""The CPU demo (`demo.py`): a synthetic image–text world with dialogues about it, stand-in pre-training of tiny
towers, and the real pretrained weights that ship inside packages (SmolLM2, GloVe)."""
