"""Peer (c): LitServe with its batching on.

``decode_request`` preprocesses one upload (``service.preprocess.preprocess_roi``), ``batch``
stacks the tensors, ``predict`` runs one ``session.run``; same maximum batch and batch window as
our server. Run ``BENCH_MODEL=... python -m benchmarks.peers.litserve_server --port N``.
"""

from __future__ import annotations

import argparse
from typing import List

import litserve as ls
import numpy as np

from benchmarks.peers.common import batch_wait_ms, load_session, max_batch, run_batch
from service.preprocess import preprocess_roi


class AnemiaLitAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.session, self.spec, self.threshold = load_session()

    # ``request`` and the response stay unannotated: LitServe reads these two annotations at run time
    # to choose how to parse the body and build the route, and postponed annotations are strings.
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return preprocess_roi(data, None, self.spec).tensor[0]

    def batch(self, inputs: List[np.ndarray]) -> np.ndarray:
        return np.stack(inputs, axis=0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return run_batch(self.session, batch)

    def unbatch(self, output: np.ndarray) -> List[float]:
        return [float(p) for p in output]

    def encode_response(self, output: float):  # type: ignore[no-untyped-def]
        return {"anemia_probability": output, "label": "anemic" if output >= self.threshold else "non-anemic"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = AnemiaLitAPI(max_batch_size=max_batch(), batch_timeout=batch_wait_ms() / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
