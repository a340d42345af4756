"""Grammar-constrained decoding (structured outputs): what a request constrains, checking
it before any worker sees it, compiled grammars cached per worker, one matcher per
sequence, and the token bitmask applied to a batch's logits.

`spec`, `validate` and `grammar_cache` are torch-free (the router validates with them);
`matcher` and `apply_bitmask` touch tensors and import torch.
"""

from common.structured_output.spec import StructuredOutputKind, StructuredOutputSpec

__all__ = ["StructuredOutputKind", "StructuredOutputSpec"]
