"""`pdserve run-batch`: a file of OpenAI API requests in, a file of responses out.

The OpenAI batch format. Each input line is
`{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body"}`;
each output line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, in input order. The engine runs in this process and every valid request is
submitted at once, so they are batched together. With `--url`, the requests go to a
running server instead (`pdserve serve`, or any OpenAI-compatible one), up to
--max-concurrency at a time, and the engine flags are not used.

A bad line never stops the run and is never dropped: a line that is not a request
(not JSON, no custom_id, wrong method or url) gets `"response": null` and `"error":
{"code", "message"}`; a request the API would refuse (invalid body, unknown model, a
prompt longer than the context) gets the response the API would give, a 400 or 404
with its error body, as OpenAI's batch output does.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from common.config.arg_types import int_at_least
from common.generation_config import read_chat_template
from common.model_files import resolve_model
from common.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    PreparedRequest,
    ServedModel,
    bad_request,
    chat_completion_response,
    completion_response,
    prepare_chat,
    prepare_completion,
)
from common.output_processor import OutputProcessor, RequestText
from common.tokenizer import Tokenizer, load_tokenizer
from pdserve.cli.api_client import ApiClient, ApiError, add_server_args

DEFAULT_MAX_CONCURRENCY = 64
COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
SUPPORTED_URLS = (COMPLETIONS_URL, CHAT_URL)


def register(subparsers: Any) -> None:
    from common.config.engine_args import add_engine_args

    parser = subparsers.add_parser(
        "run-batch",
        help="Run a file of OpenAI API requests (the batch format) through the engine.",
        description=(
            "Run a batch of OpenAI API requests. Each line of the input file is "
            '{"custom_id", "method": "POST", "url": "/v1/completions" or "/v1/chat/completions", '
            '"body": {...}}; each line of the output is the response to the input line at the same '
            "place, with the same custom_id."
        ),
    )
    parser.add_argument(
        "-i",
        "--input-file",
        required=True,
        help="The path to the input file of requests, one JSON object a line; '-' reads stdin.",
    )
    parser.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="The path to the output file, one JSON object a line; '-' writes stdout.",
    )
    server = parser.add_argument_group("against a running server")
    add_server_args(server, url_default=None, model=False)
    server.add_argument(
        "--max-concurrency",
        type=int_at_least(1),
        default=DEFAULT_MAX_CONCURRENCY,
        help="With --url: the most requests in flight at once.",
    )
    parser.add_argument(
        "--response-role",
        default="assistant",
        help="The role name to return in chat completion responses.",
    )
    parser.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="If set to True, enable prompt_tokens_details in usage.",
    )
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The subcommand: read, build the engine, run every request, write; the exit status."""
    from common.config.engine_args import engine_config_from_args

    try:
        lines = _read_lines(args.input_file)
    except OSError as exc:
        print(
            f"pdserve run-batch: -i {args.input_file}: cannot read it ({exc.strerror or exc})",
            file=sys.stderr,
        )
        return 1
    try:
        output = sys.stdout if args.output_file == "-" else open(args.output_file, "w", encoding="utf-8")
    except OSError as exc:
        print(
            f"pdserve run-batch: -o {args.output_file}: cannot write it ({exc.strerror or exc})",
            file=sys.stderr,
        )
        return 1

    if args.url:
        return _run_remote(args, lines, output)

    from common.engine.llm_engine import LLMEngine

    config = engine_config_from_args(args)
    try:
        source = resolve_model(config.model, config.revision, config.download_dir)
        tokenizer = load_tokenizer(source, config.tokenizer)
        chat_template = read_chat_template(config.chat_template)
        engine = LLMEngine.from_config(config)
    except ValueError as exc:  # ModelNotFoundError and the engine's own checks say what to do
        print(f"pdserve run-batch: {exc}", file=sys.stderr)
        return 1
    served = served_model_of(engine, tokenizer, source.name, chat_template)
    served.response_role = args.response_role
    served.enable_prompt_tokens_details = args.enable_prompt_tokens_details
    results, complete = run_batch(engine, served, lines, progress=True)
    try:
        for result in results:
            output.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        if output is not sys.stdout:
            output.close()
    return 0 if complete else 1


def _run_remote(args: argparse.Namespace, lines: list[str], output: Any) -> int:
    try:
        with ApiClient(args.url, args.api_key) as client:
            client.model()  # the server is there and answers, before any line is sent
            results, complete = run_batch_remote(client, lines, args.max_concurrency, progress=True)
    except ApiError as exc:
        print(f"pdserve run-batch: {exc}", file=sys.stderr)
        if output is not sys.stdout:
            output.close()
        return 1
    try:
        for result in results:
            output.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        if output is not sys.stdout:
            output.close()
    return 0 if complete else 1


def run_batch_remote(
    client: ApiClient,
    lines: Iterable[str],
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], bool]:
    """Every line's output line, in input order, from the server behind `client`, and
    whether every request got the server's answer (False if some could not be sent).

    Lines that are not requests get the same error lines as in-process; the server
    answers the rest, its refusals (400, 404 ...) included, as the API gives them."""
    requests = [_read_request(number, text) for number, text in enumerate(lines, 1) if text.strip()]
    results: list[dict[str, Any] | None] = [error for _, _, error in requests]
    pending = [i for i, (_, item, _) in enumerate(requests) if item is not None]
    complete = True

    def send(index: int) -> tuple[int, dict[str, Any]]:
        custom_id, item, _ = requests[index]
        assert item is not None
        body = item.get("body")
        if isinstance(body, dict) and body.get("stream"):
            error = bad_request("stream is not supported in a batch; drop it or set it to false", "stream")
            return index, _response(custom_id, error.status, error.to_body())
        response = client.post(item["url"].removeprefix("/v1"), body)
        try:
            answer = response.json()
        except ValueError:
            answer = OpenAIError(response.status_code, response.text[:1000]).to_body()
        result = _response(custom_id, response.status_code, answer)
        result["response"]["request_id"] = (
            response.headers.get("x-request-id") or result["response"]["request_id"]
        )
        return index, result

    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="run-batch") as pool,
        tqdm(
            total=len(pending), desc="Running batch", unit="req", file=sys.stderr, disable=not progress
        ) as bar,
    ):
        futures = {pool.submit(send, index): index for index in pending}
        for future in as_completed(futures):
            try:
                index, result = future.result()
            except ApiError as exc:  # the server went away: this line says so, the others go on
                complete = False
                index = futures[future]
                result = _line_error(requests[index][0], "request_failed", str(exc))
            results[index] = result
            bar.update(1)
    return [result for result in results if result is not None], complete


def served_model_of(
    engine: Any, tokenizer: Tokenizer, source_name: str, chat_template: str | None = None
) -> ServedModel:
    """What the API layer needs to know about an engine's model."""
    config = engine.config
    return ServedModel(
        names=list(config.served_model_name or [source_name]),
        max_model_len=engine.max_model_len,
        tokenizer=tokenizer,
        vocab_size=engine.vocab_size,
        generation_defaults=engine.default_sampling_overrides(),
        max_logprobs=engine.max_logprobs,
        chat_template=chat_template,
        structured_outputs=config.structured_outputs_config,
    )


@dataclass
class _Line:
    """One input line: what it asked, and its answer once known."""

    custom_id: Any = None
    prepared: PreparedRequest | None = None
    outputs: list[RequestText] = field(default_factory=list)
    result: dict[str, Any] | None = None
    unfinished: int = 0


def run_batch(
    engine: Any, served: ServedModel, lines: Iterable[str], progress: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    """Every line's output line, in input order, and whether the engine ran to the end.

    Blank lines are not requests and get no output line. If the engine itself fails,
    the lines it had not finished get a 500 error line; none is dropped.
    """
    batch = [_parse_line(number, text, served) for number, text in enumerate(lines, 1) if text.strip()]
    processor = OutputProcessor(served.tokenizer)
    owners: dict[str, _Line] = {}
    for number, line in enumerate(batch):
        if line.prepared is not None:
            _submit(engine, processor, number, line, owners)

    pending = [line for line in batch if line.unfinished]
    complete = True
    from tqdm import tqdm

    with tqdm(
        total=len(pending), desc="Running batch", unit="req", file=sys.stderr, disable=not progress
    ) as bar:
        try:
            while engine.has_unfinished_requests():
                deltas, stopped = processor.process_outputs(engine.step())
                if stopped:
                    engine.abort_request(stopped)
                for delta in deltas:
                    if delta.finished:
                        line = owners.pop(delta.request_id)
                        line.unfinished -= 1
                        if line.unfinished == 0:
                            line.result = _finished_result(line, served)
                            bar.update(1)
        except Exception as exc:  # an engine failure must still answer every line
            complete = False
            error = OpenAIError(
                500, f"the engine failed while running the batch: {type(exc).__name__}: {exc}"
            )
            print(f"pdserve run-batch: {error.message}", file=sys.stderr)
            try:  # leave the engine clean for whoever holds it next
                engine.abort_request(list(owners))
            except Exception as abort_error:
                print(
                    f"pdserve run-batch: aborting the unfinished requests failed too: {abort_error}",
                    file=sys.stderr,
                )
            for line in batch:
                if line.result is None:
                    line.result = _response(line.custom_id, error.status, error.to_body())

    for line in batch:
        if line.result is None:  # the engine stopped without finishing it: a bug, reported, not hidden
            complete = False
            error = OpenAIError(500, "the engine finished without completing this request")
            line.result = _response(line.custom_id, error.status, error.to_body())
    return [line.result for line in batch], complete


def _read_request(number: int, text: str) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """(custom_id, the request, None) for a line that is a request; (custom_id, None, its
    error line) for one that is not."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, None, _line_error(None, "invalid_json", f"line {number} is not valid JSON ({exc})")
    if not isinstance(item, dict):
        return None, None, _line_error(None, "invalid_request", f"line {number} must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        error = _line_error(
            custom_id, "invalid_request", f"line {number}: custom_id must be a non-empty string"
        )
    elif item.get("method") != "POST":
        error = _line_error(
            custom_id, "invalid_method", f'line {number}: method must be "POST", got {item.get("method")!r}'
        )
    elif item.get("url") not in SUPPORTED_URLS:
        error = _line_error(
            custom_id,
            "invalid_url",
            f"line {number}: url {item.get('url')!r} is not supported; use one of {', '.join(SUPPORTED_URLS)}",
        )
    else:
        return custom_id, item, None
    return custom_id, None, error


def _parse_line(number: int, text: str, served: ServedModel) -> _Line:
    custom_id, item, error = _read_request(number, text)
    line = _Line(custom_id=custom_id, result=error)
    if item is not None:
        try:
            line.prepared = _prepare(item["url"], item.get("body"), served)
        except OpenAIError as exc:
            line.result = _response(custom_id, exc.status, exc.to_body())
        except Exception as exc:  # a bug here must cost this line only, and say so
            error = OpenAIError(
                500, f"internal error while preparing this request: {type(exc).__name__}: {exc}"
            )
            line.result = _response(custom_id, error.status, error.to_body())
    return line


def _prepare(url: str, body: Any, served: ServedModel) -> PreparedRequest:
    if body is None:
        raise bad_request('the line has no body; give the request body as "body": {...}', "body")
    request_type = CompletionRequest if url == COMPLETIONS_URL else ChatCompletionRequest
    request = request_type.parse(body)
    if request.stream:
        raise bad_request("stream is not supported in a batch; drop it or set it to false", "stream")
    if url == COMPLETIONS_URL:
        return prepare_completion(request, served)
    return prepare_chat(request, served)


def _submit(
    engine: Any, processor: OutputProcessor, number: int, line: _Line, owners: dict[str, _Line]
) -> None:
    prepared = line.prepared
    tracked: list[str] = []  # known to the output processor
    submitted: list[str] = []  # accepted by the engine
    try:
        for spec in prepared.sequences:
            engine_id = f"{number}-{spec.request_id}"  # unique even if two lines reuse a request_id
            line.outputs.append(processor.add_request(engine_id, spec.prompt_token_ids, prepared.options))
            tracked.append(engine_id)
            engine.add_request(
                engine_id,
                spec.prompt_token_ids,
                spec.sampling_params,
                priority=prepared.priority,
                cache_salt=prepared.cache_salt,
            )
            submitted.append(engine_id)
    except Exception as exc:  # the engine refused it (ValueError: its own limits); the other lines go on
        for engine_id in tracked:
            processor.abort(engine_id)
        if submitted:
            engine.abort_request(submitted)
        if isinstance(exc, ValueError):
            error = bad_request(str(exc))
        else:
            error = OpenAIError(500, f"the engine could not take this request: {type(exc).__name__}: {exc}")
        line.result = _response(line.custom_id, error.status, error.to_body())
        line.outputs.clear()
        return
    for engine_id in submitted:
        owners[engine_id] = line
    line.unfinished = len(submitted)


def _finished_result(line: _Line, served: ServedModel) -> dict[str, Any]:
    failed = next((output.error for output in line.outputs if output.error), None)
    if failed is not None:
        error = OpenAIError(500, f"the engine failed this request: {failed}")
        return _response(line.custom_id, error.status, error.to_body())
    prepared, details = line.prepared, served.enable_prompt_tokens_details
    if prepared.kind == "completion":
        body = completion_response(prepared, line.outputs, details)
    else:
        body = chat_completion_response(prepared, line.outputs, details, role=served.response_role)
    return _response(line.custom_id, 200, body)


def _response(custom_id: Any, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def _line_error(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    with open(path, encoding="utf-8") as file:
        return file.read().splitlines()
