"""`python -m specdec.launch_server` / `specdec serve`: the OpenAI-compatible HTTP server.

    python -m specdec.launch_server --port 30000     # embedded SmolLM2 + its EAGLE3 head
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading

from .cli_args import add_engine_args, engine_kwargs, resolve_speculative_defaults

log = logging.getLogger("specdec")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    g = parser.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    g.add_argument("--port", type=int, default=30000, help="Port to listen on.")
    g.add_argument("--served-model-name", default=None,
                   help="Model id reported by /v1/models and accepted in requests "
                   "(default: the model folder's name).")
    g.add_argument("--api-key", default=None,
                   help="Require `Authorization: Bearer <key>` on every route but /health.")
    g.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                   help="Largest accepted request body; bigger bodies get a 413.")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=5.0,
                   help="On SIGTERM/SIGINT: stop admitting, let running requests finish for up to this "
                   "many seconds, then abort (answer) the rest and exit; a second signal stops at once.")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from specdec.engine import Engine
    from specdec.engine_loop import EngineLoop
    from specdec.server.app import create_app
    from specdec.server.chat_template import load_chat_template, with_tool_parser
    from specdec.server.state import ServerState

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.graceful_shutdown_timeout >= 0:
        raise ValueError(f"--graceful-shutdown-timeout must be >= 0 seconds, got {args.graceful_shutdown_timeout}")
    kwargs = resolve_speculative_defaults(engine_kwargs(args))
    if kwargs.get("node_rank", 0) > 0:  # --tp over machines: this node runs its ranks, node 0 serves
        from specdec.distributed import serve_node

        return serve_node(kwargs)
    print(f"[specdec] loading {kwargs.get('model_path') or 'the embedded SmolLM2-135M-Instruct'} ...",
          file=sys.stderr, flush=True)
    engine = Engine(**kwargs)
    template = None
    if engine.tokenizer is not None:
        template = with_tool_parser(load_chat_template(args.chat_template, engine.model_path),
                                    args.tool_call_parser)
    name = args.served_model_name or engine.model_path.name
    loop = EngineLoop(engine)
    state = ServerState(engine, loop, template, name, args.api_key, args.max_request_bytes,
                        server_args={k: ("<redacted>" if k == "api_key" and v else _plain(v))
                                     for k, v in vars(args).items() if k != "func"})
    spec = engine.spec_config
    print(f"[specdec] serving {name!r} on http://{args.host}:{args.port} "
          f"(speculative: {spec.algorithm if spec else 'off'}"
          + (f", steps {spec.num_steps} topk {spec.topk} draft tokens {spec.num_draft_tokens}" if spec else "")
          + (", adaptive" if spec and spec.adaptive else "") + (", copies merged" if spec and spec.ngram_merge else "")
          + f"; CPU kernels: {engine.cpu_isa})",
          file=sys.stderr, flush=True)
    # HTTP in a thread, the engine loop on the main thread (engine_loop.py says why): signals
    # reach the main thread, which stops both
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                           log_level=args.log_level))
    http = threading.Thread(target=server.run, name="specdec-http", daemon=True)

    def shut_down(signum: int, frame: object) -> None:
        server.should_exit = True  # no new connections
        if loop.draining:  # a second signal: stop now
            print(f"[specdec] {signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
            loop.stop()
            return
        print(f"[specdec] {signal.Signals(signum).name}: shutting down (running requests get up to "
              f"{args.graceful_shutdown_timeout:g} s)", file=sys.stderr, flush=True)
        loop.drain(args.graceful_shutdown_timeout)

    previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    http.start()
    watcher = threading.Thread(target=_stop_when_done, args=(http, loop), name="specdec-http-watch", daemon=True)
    watcher.start()
    # everything loaded so far lives as long as the server: out of the cyclic collector's way, so
    # its periodic full collections stop walking the model and the libraries at every few
    # hundred steps (vLLM does the same after start-up; +1 % plain, +4 % EAGLE3 decode here)
    gc.collect()
    gc.freeze()
    try:
        loop.run()
    finally:
        gc.unfreeze()
        server.should_exit = True
        engine.shutdown()
        http.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stop_when_done(http: threading.Thread, loop: object) -> None:
    """The HTTP thread ended (it could not bind its port, or shut down): stop the engine loop."""
    http.join()
    loop.stop()  # type: ignore[attr-defined]


def _plain(v: object) -> object:
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec serve", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_args(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"specdec serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
