"""``textgen-serve``: an OpenAI-compatible HTTP server for a textgen model file, with continuous batching.

Arguments are checked and the port is bound before the model loads, so a bad flag or a busy port is one
``error: ...`` line and exit code 2. SIGTERM (and Ctrl-C) stop accepting connections, let running requests finish
for up to ``--shutdown-timeout`` seconds, cancel the rest, and exit 0 (130 after Ctrl-C). Never imports torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from repl.cli import CliError, _assignment, _Parser, _positive_int, model_location
from runtime.errors import first_line
from serve import STREAM_INTERVAL_S

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
API_KEY_ENV = "TEXTGEN_API_KEY"

DESCRIPTION = "Serve a textgen model file over OpenAI's HTTP API (completions and chat), batching all requests."
EPILOG = """\
examples:
  textgen-serve                                    # the bundled demo model on http://127.0.0.1:8000
  textgen-serve --model gpt2.onnx --port 8080 --api-key SECRET --set temperature=0.7

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  print(client.completions.create(model="demo", prompt="ROMEO:", max_tokens=50).choices[0].text)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="textgen-serve", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="PATH", help="model file (default: the bundled demo model)")
    parser.add_argument("--model-name", metavar="NAME",
                        help="the model id clients send (default: the file name without .onnx; 'demo' for the demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="onnxruntime threads")
    parser.add_argument("--max-batch", type=_positive_int, default=32, metavar="N",
                        help="sequences decoded together at most (default 32); more requests wait in a queue")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV})")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="a default setting for every request, e.g. --set temperature=0.7 (repeatable)")
    parser.add_argument("--chat-template", metavar="FILE.json",
                        help="chat template for /v1/chat/completions (see docs/serving.md)")
    parser.add_argument("--stream-interval", type=_milliseconds, default=STREAM_INTERVAL_S * 1000, metavar="MS",
                        help=f"while several streams are open, each sends at most one chunk per MS milliseconds "
                             f"(default {STREAM_INTERVAL_S * 1000:g}; 0 = every token at once; one stream alone "
                             f"always gets every token at once)")
    parser.add_argument("--max-tokens-cap", type=_positive_int, default=4096, metavar="N",
                        help="largest max_tokens a request may ask for (default 4096)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=1024 * 1024, metavar="N",
                        help="largest request body in bytes (default 1 MiB; larger gets 413)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, seconds running requests may take to finish (default 10)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default warning)")
    return parser


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds (a number >= 0), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected milliseconds (a number >= 0), got {text}")
    return value


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def _chat_template(path: str | None, metadata: dict[str, str]) -> Any:
    from serve.chat import METADATA_KEY, ChatTemplate, parse_template

    if path is not None:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read --chat-template {path}: {exc.strerror or exc}") from None
        return parse_template(text, path)
    if METADATA_KEY in metadata:
        return parse_template(metadata[METADATA_KEY], f"model metadata {METADATA_KEY}")
    return ChatTemplate()


def _run(args: argparse.Namespace) -> int:
    from runtime.settings import build_settings

    cli_settings = [_assignment(text) for text in args.assignments]
    build_settings({}, cli_settings)  # a bad --set fails before the port and the model
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    sock = _bind(args.host, args.port)
    try:
        return _serve(args, sock, cli_settings, api_key)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock: socket.socket, cli_settings: list[tuple[str, str]],
           api_key: str | None) -> int:
    import uvicorn

    from runtime.session import OnnxModel
    from runtime.settings import build_settings
    from serve.app import ServerConfig, create_app

    with model_location(args.model) as path:
        model = OnnxModel.open(path, device=args.device, threads=args.threads)
        for note in (model.device_note, model.file_note):  # CUDA not usable; an int8 file this CPU may get wrong
            if note:
                print(f"note: {note}", file=sys.stderr)
        for warning in build_settings(model.info.generation, cli_settings).warnings:
            print(f"note: {warning}", file=sys.stderr)
        metadata = dict(model.session.get_modelmeta().custom_metadata_map)
        name = args.model_name or ("demo" if args.model is None else path.stem)
        config = ServerConfig(model=model, model_id=name, cli_settings=cli_settings, api_key=api_key,
                              max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                              stream_interval=args.stream_interval / 1000,
                              max_tokens_cap=args.max_tokens_cap, chat_template=_chat_template(args.chat_template,
                                                                                               metadata))
        app = create_app(config)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                               timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on"))
        host, port = sock.getsockname()[:2]
        print(f"textgen-serve: model '{name}' ({path.name}, {model.provider}) on http://{host}:{port}/v1",
              file=sys.stderr, flush=True)
        received: list[int] = []
        # uvicorn re-raises the signal that stopped it once it has shut down; with this handler in place that
        # only records it, so a SIGTERM ends in exit 0 after the graceful shutdown.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
        return EXIT_OK if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, never a traceback
        from runtime.modelfile import ModelFileError
        from serve.chat import ChatTemplateError
        from serve.schemas import SettingError

        user_error = isinstance(exc, (CliError, ModelFileError, ChatTemplateError, SettingError, OSError))
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
