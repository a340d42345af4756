"""Text side of the model: tokenizer, chat templates, incremental detokenization, stop strings.

Torch-free: the router tokenizes, renders chat templates and detokenizes itself.
"""

from common.tokenizer.chat_template import ChatTemplateError, render_chat_template
from common.tokenizer.detokenizer import IncrementalDetokenizer
from common.tokenizer.stop_strings import StopCheck, StopChecker
from common.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "StopCheck",
    "StopChecker",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]
