"""Pure tensor math: plans, per-row counts, text-saliency score, pruning, bipartite soft matching.

This package's ``__init__`` and :mod:`.counts` import no torch at import time (configs count tokens
with them), the other modules do.
"""

#: how the text-saliency score combines attention heads: PuMer Eq. (1) sums them; the released
#: code's ViLT VQA run reads the first head only
SALIENCY_HEADS = ("sum", "first")
