"""The reference's neumf.py: `from neumf import NeuMF` works as it does there. The model lives in
ncflib/models.py, with the rest of the library (a package, so that torch.hub loads it beside a
caller's own modules of the same names)."""
from ncflib.models import NeuMF  # noqa: F401
