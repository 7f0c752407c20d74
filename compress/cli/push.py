"""``compress push``: check a saved folder and upload it to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from .prune import progress_bars
from .summary import out


def run(args: argparse.Namespace) -> int:
    from compress.hub import push_to_hub

    with progress_bars(bool(args.verbose)):  # loading the weights to check them is not the command's output
        url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          token=args.token, commit_message=args.message)
    out(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0
