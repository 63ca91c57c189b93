"""`accelerate launch ... tests/two_process_run.py TRAIN_FLAGS...`: a training run through the Python API that
counts DDP's gradient all-reduces with a comm hook. Each process writes OUTPUT_DIR/allreduce-rank{r}.json:
the hook's calls, the number of gradient buckets, and the optimizer steps the run applied."""

from __future__ import annotations

import json
import os
import sys

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.callbacks import TrainerCallback
from calligrapher_rl.training.trainer import Trainer


class CountAllReduces(TrainerCallback):
    def __init__(self):
        self.buckets, self.steps = [], 0

    def on_train_begin(self, trainer) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.buckets.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.stack.train_model.register_comm_hook(None, hook)

    def on_log(self, trainer, step, phase, logs) -> None:
        self.steps += int(logs.get("rl/optimizer_steps", 0))

    def on_train_end(self, trainer, state) -> None:
        path = os.path.join(trainer.cfg.output_dir, f"allreduce-rank{trainer.acc.process_index}.json")
        with open(path, "w") as fh:
            json.dump({"calls": len(self.buckets), "buckets": len(set(self.buckets)), "steps": self.steps}, fh)


def main() -> int:
    from calligrapher_rl.training.distributed import end_process_group

    trainer = Trainer(parse_args(sys.argv[1:]), callbacks=[CountAllReduces()])
    acc, outcome = trainer.acc, trainer.run()
    del trainer
    end_process_group(acc)  # what train() does for the command line
    return 0 if outcome == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
