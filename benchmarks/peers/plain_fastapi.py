"""Peer (a): FastAPI + ONNX Runtime the way tutorials write it.

One ``session.run`` per request, inside an ``async def`` handler, with the preprocessing inline:
no batching, no thread pool, no admission control. Serve with
``BENCH_MODEL=... uvicorn benchmarks.peers.plain_fastapi:app``.
"""

from __future__ import annotations

from typing import Dict

from fastapi import FastAPI, File, UploadFile

from benchmarks.peers.common import load_session, run_batch
from service.preprocess import preprocess_roi

app = FastAPI(title="plain FastAPI + ONNX Runtime")
session, spec, threshold = load_session()


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
async def predict(image: UploadFile = File(...)) -> Dict[str, object]:
    data = await image.read()
    tensor = preprocess_roi(data, None, spec).tensor
    probability = float(run_batch(session, tensor)[0])
    return {"anemia_probability": probability, "label": "anemic" if probability >= threshold else "non-anemic"}
