"""Open Inference Protocol V2 (KServe / Triton HTTP): routes, the request model, the repository."""
