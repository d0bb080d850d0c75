"""hopgate: an OOD gatekeeper for image classifiers.

Three packages, one direction of imports:

* ``hopgate`` (this folder): what both halves share -- the version, the bundle contract
  (``hopgate.bundle``) and the pixel policy (``hopgate.pixels``), plus the Python client
  (``hopgate.client``, over httpx) and folder screening (``hopgate.screen``). numpy, pydantic,
  Pillow, httpx only.
* ``hopgate.model_export`` (folder ``model_export/``): everything that needs torch.
* ``hopgate.service`` (folder ``service/``): serving on onnxruntime; never imports torch or
  the export half.
"""

__version__ = "0.1.0"  # the one place; pyproject.toml reads it
