"""Write a model folder for serving benchmarks with dummy weights: a bundled config's shapes
with the embedded model's tokenizer (so its vocabulary), for `pdserve serve --load-format dummy`
and `pdserve bench serve --tokenizer DIR` (docs/benchmarks.md, "End to end on one H100").

    pdserve bench make-model OUT_DIR [--model-config llama-3-8b]

Needs transformers (the test extra) to export the tokenizer from the GGUF.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def make_bench_model(out_dir: Path, model_config: str = "llama-3-8b") -> Path:
    from transformers import AutoTokenizer

    from common.model_files import embedded_default_model
    from common.models.configs import bundled_config

    source = embedded_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config_path = Path(model_config) if Path(model_config).is_file() else bundled_config(model_config)
    config = json.loads(config_path.read_text())
    config["vocab_size"] = len(tokenizer)
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = tokenizer.eos_token_id
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def add_make_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument(
        "--model-config", default="llama-3-8b", help="a bundled config name or a config.json path"
    )


def run_make_model(args: argparse.Namespace) -> int:
    """Write the folder and print its path."""
    print(make_bench_model(args.out_dir, args.model_config))
    return 0
