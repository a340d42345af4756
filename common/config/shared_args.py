"""The flags that the router and the workers both take, declared once: the model and
tokenizer they serve, how prompts are cut and hashed into KV-cache blocks, and the
cluster secret. vLLM's names and help texts. Torch-free.

The workers read the model's weights with these flags; the router reads only its
tokenizer and config, to validate and tokenize requests as the workers would. One
declaration means one help text and one default, so the two can never drift apart.
"""

from __future__ import annotations

from typing import Any

from common.block_hash import HASH_ALGOS as PREFIX_CACHING_HASH_ALGOS
from common.config.arg_parser import JsonObjectAction
from common.config.arg_types import choice, human_int, int_at_least
from common.frame_auth import SECRET_ENV, SECRET_FILE_ENV

BLOCK_SIZES = (1, 8, 16, 32, 64, 128)

SIZE_SUFFIXES_HELP = "Accepts human-readable k/m/g/K/M/G: 1k -> 1,000, 1K -> 1,024, 25.6k -> 25,600."
JSON_HELP = (
    "Should either be a valid JSON string or JSON keys passed individually "
    "(--{flag}.KEY VALUE, nested --{flag}.KEY.SUBKEY VALUE, list items --{flag}.KEY+ VALUE)."
)
# Help texts that are built, built once: every parser that declares the flag shows the
# very same object.
_MAX_MODEL_LEN_HELP = (
    "Model context length (prompt and output); the router answers longer requests with 400. "
    f"If unspecified, will be automatically derived from the model config. {SIZE_SUFFIXES_HELP}"
)
_OVERRIDE_GENERATION_CONFIG_HELP = (
    'Overrides or sets generation config. e.g. {"temperature": 0.5}. If used with '
    "--generation-config auto, the override parameters will be merged with the default config "
    "from the model. If used with --generation-config vllm, only the override parameters are "
    "used. " + JSON_HELP.format(flag="override-generation-config")
)
_CLUSTER_SECRET_HELP = (
    "A file holding the cluster secret (16 bytes or more); give every router and worker the same "
    "one. Messages between them and KV side-channel requests carry its HMAC tag, and those "
    f"without a valid one are dropped. Also read from ${SECRET_FILE_ENV}, or the secret itself "
    f"from ${SECRET_ENV}. (default: none, messages are not authenticated; see docs/security.md)"
)


def add_model_args(group: Any) -> None:
    """The model and tokenizer flags (router and workers)."""
    group.add_argument(
        "--model",
        default=None,
        help="Name or path of the Hugging Face model to use: a local folder, a .gguf file, or a Hub "
        "id. It is also used as the content for the model_name tag in metrics output when "
        "served_model_name is not specified. The router reads only its tokenizer and config. "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        help="Name or path of the Hugging Face tokenizer to use. If unspecified, model name or path "
        "will be used.",
    )
    group.add_argument(
        "--hf-config-path",
        default=None,
        help="Name or path of the Hugging Face config to use. If unspecified, model name or path "
        "will be used.",
    )
    group.add_argument(
        "--revision",
        default=None,
        help="The specific model version to use. It can be a branch name, a tag name, or a commit "
        "id. If unspecified, will use the default version.",
    )
    group.add_argument(
        "--download-dir",
        default=None,
        help="Directory to download and load the weights, default to the default cache dir of Hugging Face.",
    )
    group.add_argument(
        "--max-model-len",
        type=human_int(minimum=1),
        default=None,
        help=_MAX_MODEL_LEN_HELP,
    )
    group.add_argument(
        "--max-logprobs",
        type=int_at_least(-1),
        default=20,
        help="Maximum number of log probabilities to return when logprobs is specified in "
        "SamplingParams. The default value comes from the default for the OpenAI Chat Completions "
        "API. -1 means no cap, i.e. all (output_length * vocab_size) logprobs are allowed to be "
        "returned and it may cause OOM.",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="The model name(s) used in the API. If multiple names are provided, the server will "
        "respond to any of the provided names. The model name in the model field of a response "
        "will be the first name in this list. If not specified, the model name will be the same "
        "as the --model argument. Noted that this name(s) will also be used in model_name tag "
        "content of prometheus metrics, if multiple names provided, metrics tag will take the "
        "first one.",
    )
    group.add_argument(
        "--generation-config",
        default="auto",
        help='The folder path to the generation config. Defaults to "auto", the generation config '
        'will be loaded from model path. If set to "vllm", no generation config is loaded, '
        "pdserve's defaults will be used. If set to a folder path, the generation config will be "
        "loaded from the specified folder path. If max_new_tokens is specified in generation "
        "config, then it sets a server-wide limit on the number of output tokens for all requests.",
    )
    group.add_argument(
        "--override-generation-config",
        action=JsonObjectAction,
        default={},
        help=_OVERRIDE_GENERATION_CONFIG_HELP,
    )
    group.add_argument(
        "--chat-template",
        default=None,
        help="The file path to the chat template, or the template in single-line form for the "
        "specified model.",
    )


def add_block_hashing_args(group: Any) -> None:
    """How prompts are cut into blocks and hashed: the router must hash as the workers do."""
    group.add_argument(
        "--block-size",
        type=choice(BLOCK_SIZES, int),
        choices=BLOCK_SIZES,
        default=None,
        help="Size of a contiguous cache block in number of tokens. This config has no static "
        "default: if left unspecified, it is set for the current platform (16); a router not "
        "given it uses what the workers report.",
    )
    group.add_argument(
        "--prefix-caching-hash-algo",
        type=choice(PREFIX_CACHING_HASH_ALGOS),
        choices=PREFIX_CACHING_HASH_ALGOS,
        default=None,
        help='Set the hash algorithm for prefix caching. "sha256" hashes a canonical serialization '
        '(pdserve never uses pickle for it). "sha256_cbor" provides a reproducible, '
        "cross-language compatible hash: it serializes objects using canonical CBOR and hashes them "
        'with SHA-256, the same block hashes as a vLLM worker\'s. "xxhash" and "xxhash_cbor" use the '
        "faster, non-cryptographic xxh3-128. Every worker and the router must use the same algorithm "
        "and the same seed: PYTHONHASHSEED when set, else a fixed one for sha256 and sha256_cbor; "
        "xxhash has no fixed seed, so it needs PYTHONHASHSEED or --cluster-secret-file (the seed is "
        "derived from the secret) on every worker and the router, which refuse to start without. "
        "(default: sha256; a router not given it uses what the workers report)",
    )


def add_cluster_secret_arg(group: Any) -> None:
    """--cluster-secret-file: the same file for every worker and router of a cluster."""
    group.add_argument(
        "--cluster-secret-file",
        default=None,
        metavar="PATH",
        help=_CLUSTER_SECRET_HELP,
    )
