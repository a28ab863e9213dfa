"""``nvr mine`` with test instrumentation, run as a child process by the reliability tests.

Environment knobs (all optional; the embedding shard size is an ordinary config key, ``teachers[].shard_size``):

- ``NVR_TEST_ENCODE_LOG``: append one line ``<desc>\t<num texts>`` per encoded shard (an encode counter that
  survives SIGKILL: each line is flushed and fsynced before the shard is written).
- ``NVR_TEST_ENCODE_SLEEP``: seconds to sleep after encoding each shard, so a kill lands mid-corpus.

Everything else is the real CLI: ``python reliability_mine.py --config cfg.yaml`` == ``nvr mine --config cfg.yaml``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def instrument() -> None:
    import nvr.modeling.encode as encode_module

    log_path = os.environ.get("NVR_TEST_ENCODE_LOG")
    pause = float(os.environ.get("NVR_TEST_ENCODE_SLEEP", "0"))
    real_encode = encode_module.encode_texts

    def counted_encode(embedder, texts, **kwargs) -> np.ndarray:
        emb = real_encode(embedder, texts, **kwargs)
        if log_path:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{kwargs.get('desc')}\t{len(texts)}\n")
                fh.flush()
                os.fsync(fh.fileno())
        time.sleep(pause)
        return emb

    encode_module.encode_texts = counted_encode


if __name__ == "__main__":
    instrument()
    from nvr.cli.main import main

    main(["mine", *sys.argv[1:]])
