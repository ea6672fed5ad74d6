"""Peer (b): BentoML 1.4 with its adaptive batching on.

The documented pattern: one ``@bentoml.api(batchable=True)`` method that takes a list of
uploaded files, so BentoML's dispatcher groups concurrent requests into one call; the method
preprocesses each picture (``service.preprocess.preprocess_roi``) and runs one batched
``session.run``. Same ``max_batch_size`` as our server. Serve with
``BENCH_MODEL=... bentoml serve benchmarks.peers.bento_service:AnemiaBento --port N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import bentoml
import numpy as np

from benchmarks.peers.common import load_session, max_batch, run_batch
from service.preprocess import preprocess_roi

_MAX_BATCH = max_batch()


@bentoml.service(workers=1, traffic={"timeout": 30})
class AnemiaBento:
    def __init__(self) -> None:
        self.session, self.spec, self.threshold = load_session()

    # max_latency_ms stays at BentoML's default (60 s): it is a latency budget past which the
    # dispatcher refuses work, not a batch window (the dispatcher sizes its window itself).
    @bentoml.api(batchable=True, max_batch_size=_MAX_BATCH)
    def predict(self, image: List[Path]) -> List[Dict[str, object]]:
        tensors = [preprocess_roi(path.read_bytes(), None, self.spec).tensor for path in image]
        probabilities = run_batch(self.session, np.concatenate(tensors, axis=0))
        return [
            {"anemia_probability": float(p), "label": "anemic" if p >= self.threshold else "non-anemic"}
            for p in probabilities
        ]

