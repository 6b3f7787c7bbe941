"""`python -m vikdf.web.human_eval create|serve|report ...` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging as pylogging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.utils import logging

from vikdf.web.common import LOCAL_HOST, check_port, serve
from vikdf.web.human_eval.report import build_report, report_markdown
from vikdf.web.human_eval.server import create_annotation_app
from vikdf.web.human_eval.study import create_study, login_link

logger = logging.get_logger("vikdf.web.human_eval")


PROG = "python -m vikdf.web.human_eval"


@dataclass
class CreateArguments:
    """Sample dialogues from each system's predictions into a new study database; print the annotators' links."""

    predictions: list[str] = field(metadata={"help": "predictions.jsonl of each system (eval_dialogue.py output)."})
    systems: str = field(metadata={"help": "Comma-separated system names, one per predictions file (never shown)."})
    db: str = field(metadata={"help": "SQLite file to create for the study (must not exist)."})
    sample: int = field(default=100, metadata={"help": "Dialogues to sample from the test set (paper: 100)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample and of the per-annotator order of systems."})
    annotators: int = field(default=3, metadata={"help": "Number of annotators, one login link each (paper: 3)."})
    base_url: str = field(
        default=f"http://{LOCAL_HOST}:8000", metadata={"help": "Address the server will be reached at, for the links."}
    )


@dataclass
class ServeArguments:
    """Serve the annotation page of a study."""

    db: str = field(metadata={"help": "The study's SQLite file."})
    host: str = field(default=LOCAL_HOST, metadata={"help": "Address to bind (default: this machine only)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})


@dataclass
class ReportArguments:
    """Write Table 2 (the means and Fleiss' kappa of each system) and the raw ratings."""

    db: str = field(metadata={"help": "The study's SQLite file."})
    output_dir: str = field(
        default="human_eval_report", metadata={"help": "Where human_eval.md, human_eval.json and ratings.csv go."}
    )


COMMANDS = {"create": CreateArguments, "serve": ServeArguments, "report": ReportArguments}


def command_parser() -> argparse.ArgumentParser:
    """The parser of `PROG COMMAND ...`: it lists the commands; each command's own flags go to its parser."""
    commands = "\n".join(f"  {name:<8}{arguments.__doc__}" for name, arguments in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Human evaluation of dialogue systems (paper §5.2, Table 2).\n\ncommands:\n{commands}",
        epilog=f"`{PROG} COMMAND --help` lists the flags of a command.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("flags", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None):
    """Run one sub-command; returns the login tokens (create), or the summary (report)."""
    parsed = command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command, arguments = parsed.command, COMMANDS[parsed.command]
    parser = HfArgumentParser(arguments, prog=f"{PROG} {command}", description=arguments.__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=parsed.flags)
    if command == "create":
        systems = [name.strip() for name in args.systems.split(",")]
        tokens = create_study(args.db, args.predictions, systems, args.sample, args.seed, args.annotators)
        print(f"Study {args.db}: {args.sample} dialogues × {len(systems)} systems for {len(tokens)} annotators.")
        for number, token in enumerate(tokens, 1):
            print(f"annotator {number}: {login_link(args.base_url, token)}")
        return tokens
    if command == "serve":
        check_port(args.port)
        logger.info(f"Serving {args.db} on http://{args.host}:{args.port}")
        serve(create_annotation_app(args.db), args.host, args.port)
        return None
    summary = build_report(args.db, args.output_dir)
    print(report_markdown(summary))
    print(f"Written to {args.output_dir}: human_eval.md, human_eval.json, ratings.csv")
    return summary


if __name__ == "__main__":
    pylogging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=pylogging.INFO)
    main()
