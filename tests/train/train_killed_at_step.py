"""`dinosys train` that SIGKILLs itself right after the metrics line of step K is written.

python train_killed_at_step.py K train CONFIG --out RUN key=value ...
With no checkpoint before step K this is a kill before the first checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

from dinosys.train import metrics


def main() -> None:
    kill_step, cli_args = int(sys.argv[1]), sys.argv[2:]
    original = metrics.MetricsWriter.write

    def write_then_die(self, record):  # type: ignore[no-untyped-def]
        original(self, record)
        if int(record.get("step", -1)) == kill_step and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.MetricsWriter.write = write_then_die  # type: ignore[method-assign]
    from dinosys.cli import main as cli_main

    sys.exit(cli_main(cli_args))


if __name__ == "__main__":
    main()
