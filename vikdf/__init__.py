"""VIKDF training-side library: component loading, losses, trainers, data, metrics and the tiny test world.

The model itself lives in the three root files that travel with every checkpoint (`configuration_vikdf.py`,
`modeling_vikdf.py`, `processing_vikdf.py`). `vikdf.auto` registers them with the Auto classes (the library's
checkpoint loader, `vikdf.evaluation`, imports it), so a checkpoint folder loads with the installed classes, without the
`trust_remote_code` prompt; users without the library load the same folder with `trust_remote_code=True`.

Importing the package imports nothing else: the entry points' `--help` and light tools stay free of torch.
"""
