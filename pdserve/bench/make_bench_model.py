"""Write a model folder for serving benchmarks with dummy weights: a bundled config's shapes
with the embedded model's tokenizer (so its vocabulary), for `pdserve serve --load-format dummy`
and `pdserve bench serve --tokenizer DIR` (docs/benchmarks.md, "End to end on one H100").

    pdserve bench make-model OUT_DIR [--model-config llama-3-8b] [--num-layers N] [--tokenizer DIR]

Any bundled config works, mixture-of-experts ones included; fp8 is a serving flag, not a
folder: `pdserve serve --model OUT_DIR --load-format dummy -q fp8`. The tokenizer is exported
from the embedded GGUF with transformers (the test extra), or copied from --tokenizer DIR, a
folder with tokenizer.json (one this command wrote, say), where transformers is not installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pdserve.bench.dummy_model import config_path, with_num_layers

# the files of a Hugging Face tokenizer folder that `pdserve serve` reads (common/tokenizer/hf_folder.py)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_bench_model(
    out_dir: Path,
    model_config: str = "llama-3-8b",
    num_layers: int | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """The folder `out_dir` holding config.json (the config's shapes, cut to `num_layers`
    layers if given, with the tokenizer's vocabulary size and BOS/EOS) and the tokenizer."""
    config = with_num_layers(json.loads(config_path(model_config).read_text()), num_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        vocab_size, bos, eos = _export_embedded_tokenizer(out_dir)
    else:
        vocab_size, bos, eos = _copy_tokenizer(Path(tokenizer), out_dir)
    config["vocab_size"] = vocab_size
    config["bos_token_id"] = bos
    config["eos_token_id"] = eos
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def _export_embedded_tokenizer(out_dir: Path) -> tuple[int, int | None, int | None]:
    from transformers import AutoTokenizer

    from common.model_files import embedded_default_model

    source = embedded_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    tokenizer.save_pretrained(str(out_dir))
    return len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id


def _copy_tokenizer(folder: Path, out_dir: Path) -> tuple[int, int | None, int | None]:
    from common.tokenizer.hf_folder import tokenizer_from_hf_folder

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"--tokenizer {folder}: no tokenizer.json there; pass a Hugging Face tokenizer folder "
            "(one `pdserve bench make-model` wrote will do)"
        )
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file() and folder.resolve() != out_dir.resolve():
            shutil.copyfile(folder / name, out_dir / name)
    loaded = tokenizer_from_hf_folder(out_dir)
    bos, eos = (loaded.special_tokens.get(name) for name in ("bos_token", "eos_token"))
    vocab = loaded.backend
    return vocab.get_vocab_size(), bos and vocab.token_to_id(bos), eos and vocab.token_to_id(eos)


def add_make_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument(
        "--model-config",
        default="llama-3-8b",
        help="a bundled config name (common/models/configs: llama-3-8b, llama-3.1-70b, qwen3-30b-a3b, "
        "mixtral-8x7b, smollm2-135m) or a config.json path",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="keep only the first N decoder layers (widths unchanged): a model that fits, or a quick check",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="copy the tokenizer from this folder (with tokenizer.json) instead of exporting the embedded "
        "model's with transformers",
    )


def run_make_model(args: argparse.Namespace) -> int:
    """Write the folder and print its path."""
    print(make_bench_model(args.out_dir, args.model_config, args.num_layers, args.tokenizer))
    return 0
