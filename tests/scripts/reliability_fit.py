"""``nvr fit`` with an optional pause per training step, run as a child process by the reliability tests.

``NVR_TEST_STEP_SLEEP`` (seconds) slows every training step down so that a SIGKILL lands between two checkpoints;
everything else is the real CLI: ``python reliability_fit.py --config cfg.yaml`` == ``nvr fit --config cfg.yaml``.
"""

from __future__ import annotations

import os
import sys
import time


def instrument() -> None:
    from nvr.training.module import BiEncoderModule

    pause = float(os.environ.get("NVR_TEST_STEP_SLEEP", "0"))
    if pause <= 0:
        return
    real_step = BiEncoderModule.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(pause)
        return real_step(self, *args, **kwargs)

    BiEncoderModule.training_step = slow_step


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    instrument()
    from nvr.cli.main import main

    sys.argv = [sys.argv[0], "fit", *sys.argv[1:]]  # what the console script sees: LightningCLI reads sys.argv
    main(sys.argv[1:])
