"""`specdec` command line.

    specdec serve      the OpenAI-compatible server (same flags as python -m specdec.launch_server)
    specdec chat       an interactive chat client for any OpenAI-compatible server
    specdec generate   one generation from a prompt with the offline engine
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli_args import add_engine_args, engine_kwargs, resolve_speculative_defaults


def _generate(args: argparse.Namespace) -> int:
    from specdec.server.chat_template import load_chat_template

    from .engine import Engine

    with Engine(**resolve_speculative_defaults(engine_kwargs(args))) as engine:
        if args.raw:
            prompt = args.prompt
        else:
            template = load_chat_template(args.chat_template, engine.model_path)
            prompt = template.render([{"role": "user", "content": args.prompt}])
        # unset flags take the model's generation-config defaults; this command's own are greedy
        # decoding and 128 tokens
        defaults = engine.generation_defaults
        params = {"temperature": args.temperature if args.temperature is not None
                  else (0.0 if defaults.temperature is None else None),
                  "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None
                  else (128 if defaults.max_new_tokens is None else None)}
        t0 = time.perf_counter()
        out = engine.generate(prompt=prompt, sampling_params=params)
        dt = time.perf_counter() - t0
        assert isinstance(out, dict)
        if args.json:
            print(json.dumps(out))
        else:
            print(out["text"])
            meta = out["meta_info"]
            n = meta["completion_tokens"]
            spec = f"; accept length {meta['spec_accept_length']:.2f}" if "spec_accept_length" in meta else ""
            print(f"\n[{n} tokens in {dt:.2f}s: {n / dt:.1f} tok/s{spec}; "
                  f"finish {meta['finish_reason']}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .launch_server import add_server_args, serve

    parser = argparse.ArgumentParser(prog="specdec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="Start the OpenAI-compatible HTTP server.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_args(srv)
    srv.set_defaults(func=serve)
    sub.add_parser("chat", help="Chat with an OpenAI-compatible server (specdec chat --help).",
                   add_help=False)
    train = sub.add_parser("train-eagle3", help="Train an EAGLE3 head (specdec train-eagle3 --help).",
                           add_help=False)
    del train
    gen = sub.add_parser("generate", help="Generate once from a prompt with the offline engine.")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True, help="User message (chat template applied).")
    gen.add_argument("--raw", action="store_true", help="Send the prompt as-is, no chat template.")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="Default: the model's generation config (--generation-config), else 128.")
    gen.add_argument("--temperature", type=float, default=None,
                     help="Default: the model's generation config (--generation-config), else 0 (greedy).")
    gen.add_argument("--json", action="store_true", help="Print the whole response dict as JSON.")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "chat":
        from specdec.server.chat_client import main as chat_main

        return chat_main(argv[1:])
    if argv and argv[0] == "train-eagle3":
        from specdec.draft.train_eagle3 import main as train_main

        return int(train_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
