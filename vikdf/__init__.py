"""VIKDF's training-side library; the model itself lives in the root files that travel with every checkpoint.

- `vikdf.training`: arguments, the two trainers, the five losses, masking, building a model from its components.
- `vikdf.data`: image–text pair streams, dialogue readers, collators.
- `vikdf.evaluation`: generation and Table-1 metrics over one or many processes, statistics over runs, the
  knowledge ablation, textualised knowledge, model cards.
- `vikdf.web`: the chat page and the human-evaluation study.
- `vikdf.demo`: the synthetic world, the stand-in towers and the real weights that ship in packages.
- top level: the paper's defaults (`defaults`), the entry points' up-front checks (`checks`, `quick_help`), safe
  writing (`atomic`, `output_folder`), the Auto-class registration (`auto`) and tiny parts for tests (`testing`).

`vikdf.auto` registers the root files' classes with the Auto classes (the checkpoint loader in
`vikdf.evaluation.dialogues` imports it), so a checkpoint folder loads with the installed classes, without the
`trust_remote_code` prompt; users without the library load the same folder with `trust_remote_code=True`.

Importing the package imports nothing else: the entry points' `--help` and light tools stay free of torch.
"""
