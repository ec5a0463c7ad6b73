"""Reference models built on the fastnca ops.

Submodules are imported on demand (``from fastnca.models.mednca import MedNCA``), so
``import fastnca.models`` stays cheap and pulls in no model code.
"""
