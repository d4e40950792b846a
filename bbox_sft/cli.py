"""The ``bbox-sft`` command: one sub-command per stage, each a dataclass parsed by ``HfArgumentParser``.

    bbox-sft synth    --output_dir data/synth --n 300
    bbox-sft prepare  --data_dir data/synth --output_dir data/saliency [--visualize]
    bbox-sft prepare  --download_help
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

from transformers import HfArgumentParser

from .hub import HubPushError

logger = logging.getLogger("bbox_sft")


@dataclass
class SynthArguments:
    """Arguments of ``bbox-sft synth``."""

    output_dir: str = field(metadata={"help": "Folder to write DUTS-TR/DUTS-TR-Image and -Mask into."})
    n: int = field(default=300, metadata={"help": "Number of images."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    domain: str = field(default="plain", metadata={"help": "plain | cluttered"})


def _synth(argv: list[str]) -> int:
    from .data.synthetic import write_synthetic_set

    (args,) = HfArgumentParser(SynthArguments).parse_args_into_dataclasses(args=argv)
    root = write_synthetic_set(args.output_dir, n=args.n, seed=args.seed, domain=args.domain)
    logger.info("wrote %d images and masks under %s", args.n, root)
    return 0


def _prepare(argv: list[str]) -> int:
    from .data.prepare import PrepareArguments, prepare_dataset
    from .data.sources import DOWNLOAD_HELP

    if "--download_help" in argv:
        sys.stdout.write(DOWNLOAD_HELP)
        return 0
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(args=argv)
    prepare_dataset(args)
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "synth": (_synth, "write a synthetic saliency set in the DUTS layout"),
    "prepare": (_prepare, "build the box dataset from images + masks (DUTS or any saliency set)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        sys.stdout.write("usage: bbox-sft <command> [--help]\n\ncommands:\n" + "\n".join(lines) + "\n")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command, _ = COMMANDS[argv[0]]
    try:
        return command(argv[1:])
    except HubPushError as error:
        logger.error(str(error))
        return 1
    except (FileNotFoundError, ValueError) as error:
        logger.error("error: %s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
