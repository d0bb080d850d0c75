"""The server a user writes in an afternoon (issue 15's naive peer): FastAPI + onnxruntime, one
image per call, everything inline in the async handler, no batching, uvicorn's defaults. It
decodes with hopgate's own decoder, so its verdicts are hopgate's.

    python benchmarks/peers/naive.py PORT [MODEL]
"""

import sys

import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

from hopgate.bundle import INPUT_IMAGES, OUTPUTS, load_meta
from hopgate.service.config import DEFAULT_MODEL
from hopgate.service.imaging import decode

MODEL = sys.argv[2] if len(sys.argv) > 2 else str(DEFAULT_MODEL)
meta = load_meta(MODEL)
session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/score")
async def score(request: Request) -> dict:
    x = decode(await request.body(), meta.height, meta.width, meta.channels, meta.pixels)
    out = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT_IMAGES: x[None]})))
    return {"ood": bool(out["is_ood"][0]), "score": float(out["score"][0]),
            "predicted_class": int(out["pred_class"][0]), "threshold": meta.threshold}


@app.get("/readyz")
async def ready() -> dict:
    return {"ready": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]))
