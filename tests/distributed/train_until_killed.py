"""`dinosys train` that SIGKILLs itself right after the checkpoint of step N is committed.

python -m torch.distributed.run ... train_until_killed.py N train CONFIG --out RUN key=value ...
Every rank kills itself (kill -9, no clean-up, no later checkpoint) once its collective save of
step N returned, which is after rank 0 renamed the folder and moved the ``latest`` pointer.
"""

from __future__ import annotations

import os
import signal
import sys

from dinosys.distributed import sharded_checkpoint as checkpoint


def main() -> None:
    kill_step, cli_args = int(sys.argv[1]), sys.argv[2:]
    original = checkpoint.CheckpointManager.save

    def save_then_die(self, step, *args, **kwargs):  # type: ignore[no-untyped-def]
        path = original(self, step, *args, **kwargs)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.CheckpointManager.save = save_then_die  # type: ignore[method-assign]
    from dinosys.cli import main as cli_main

    sys.exit(cli_main(cli_args))


if __name__ == "__main__":
    main()
