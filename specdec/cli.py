"""`specdec` command line: `specdec generate` (one generation from a prompt)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli_args import add_engine_args, engine_kwargs


def _generate(args: argparse.Namespace) -> int:
    from specdec.server.chat_template import load_chat_template

    from .engine import Engine

    with Engine(**engine_kwargs(args)) as engine:
        if args.raw:
            prompt = args.prompt
        else:
            template = load_chat_template(args.chat_template, engine.model_path)
            prompt = template.render([{"role": "user", "content": args.prompt}])
        params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
        t0 = time.perf_counter()
        out = engine.generate(prompt=prompt, sampling_params=params)
        dt = time.perf_counter() - t0
        assert isinstance(out, dict)
        if args.json:
            print(json.dumps(out))
        else:
            print(out["text"])
            n = out["meta_info"]["completion_tokens"]
            print(f"\n[{n} tokens in {dt:.2f}s: {n / dt:.1f} tok/s; "
                  f"finish {out['meta_info']['finish_reason']}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="Generate once from a prompt with the offline engine.")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True, help="User message (chat template applied).")
    gen.add_argument("--raw", action="store_true", help="Send the prompt as-is, no chat template.")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--json", action="store_true", help="Print the whole response dict as JSON.")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
