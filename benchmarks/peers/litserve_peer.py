"""LitServe with its own batching over the same onnxruntime session and decoder (issue 15's
LitServe peer). LitServe's API takes JSON or a form, never a raw body, so this peer is sent
the same JPEG as a multipart ``images`` part. Runs in its own venv (LitServe pulls uvloop and
httptools, which would change what the other servers run on):

    python -m venv /tmp/ls && /tmp/ls/bin/pip install litserve onnxruntime pillow \
        pydantic-settings && /tmp/ls/bin/pip install --no-deps -e .
    /tmp/ls/bin/python benchmarks/peers/litserve_peer.py PORT [MODEL]
"""

import sys

import litserve as ls
import numpy as np
import onnxruntime as ort

from hopgate.bundle import INPUT_IMAGES, OUTPUTS, load_meta
from hopgate.service.config import DEFAULT_MODEL
from hopgate.service.imaging import decode

MODEL = sys.argv[2] if len(sys.argv) > 2 else str(DEFAULT_MODEL)


class Gate(ls.LitAPI):
    def setup(self, device):
        self.meta = load_meta(MODEL)
        self.session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])

    def decode_request(self, request):
        m = self.meta
        return decode(request["images"].file.read(), m.height, m.width, m.channels, m.pixels)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), {INPUT_IMAGES: x})))

    def unbatch(self, out):
        return [{k: v[i] for k, v in out.items()} for i in range(len(out["score"]))]

    def encode_response(self, out):
        return {"ood": bool(out["is_ood"]), "score": float(out["score"]),
                "predicted_class": int(out["pred_class"]), "threshold": self.meta.threshold}


if __name__ == "__main__":
    api = Gate(max_batch_size=32, batch_timeout=0.002, api_path="/score")
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, healthcheck_path="/readyz",
                 ).run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False,
                       log_level="warning")
