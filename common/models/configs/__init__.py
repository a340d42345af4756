"""config.json files of well-known models, for `--load-format dummy` benchmarks at real shapes.

Pass one as --hf-config-path, e.g. `--load-format dummy --hf-config-path
common/models/configs/llama-3-8b.json`. README.md lists them and what each is for.
"""

from pathlib import Path

CONFIGS_DIR = Path(__file__).parent


def bundled_config(name: str) -> Path:
    """The path of configs/<name>.json, e.g. bundled_config("llama-3-8b")."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
        raise FileNotFoundError(f"no bundled config {name!r}; bundled: {known}")
    return path
