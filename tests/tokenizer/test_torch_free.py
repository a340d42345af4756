"""The router imports the text side of the model; it must not pull in torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_tokenizer_modules_leaves_torch_out():
    code = (
        "import sys\n"
        "import common.tokenizer.tokenizer, common.tokenizer.chat_template, common.tokenizer.detokenizer\n"
        "import common.tokenizer.stop_strings, common.tokenizer.gguf_vocab, common.tokenizer.hf_folder\n"
        "from common.model_files import embedded_default_model\n"
        "from common.tokenizer import load_tokenizer\n"
        "tokenizer = load_tokenizer(embedded_default_model())\n"
        "tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "print('torch' in sys.modules, 'triton' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
