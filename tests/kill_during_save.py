"""Run `train_dialogue.py` or `train_pretrain.py` and kill the process (`os._exit`, as `kill -9` would: no clean-up)
at one point of a save: `python kill_during_save.py SCRIPT POINT STEP ARGS...`.

POINT is where the checkpoint save at global step STEP dies: `before_weights`, `after_weights` or `after_optimizer`.
"""

import os
import sys

from transformers import Trainer

import train_dialogue
import train_pretrain
from vikdf.training.trainable_checkpoints import TrainableCheckpointMixin

KILLED = 17


def main() -> None:
    script, point, step, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    save_model, save_optimizer = TrainableCheckpointMixin.save_model, Trainer._save_optimizer_and_scheduler

    def die_at(self, here: str) -> None:
        if point == here and self.state.global_step == step:
            os._exit(KILLED)

    def killing_save_model(self, output_dir=None, _internal_call=False):
        die_at(self, "before_weights")
        save_model(self, output_dir, _internal_call)
        die_at(self, "after_weights")

    def killing_save_optimizer(self, output_dir):
        save_optimizer(self, output_dir)
        die_at(self, "after_optimizer")

    # The VIKDF trainers reach these through super(), so patching these classes covers both (and both checkpoint
    # layouts: the checkpoint mixin writes the trainable weights, or hands a whole model to the Trainer's save_model).
    TrainableCheckpointMixin.save_model = killing_save_model
    Trainer._save_optimizer_and_scheduler = killing_save_optimizer
    {"train_dialogue": train_dialogue, "train_pretrain": train_pretrain}[script].main(argv)


if __name__ == "__main__":
    main()
