"""``icrm`` console entry point: a thin layer over :mod:`icrm.pipeline`, :mod:`icrm.trainers` and
:mod:`icrm.inference`.

Subcommands::

    icrm train  [--config cfg.yaml] [--field value ...]   SFT the generator, train BT / GRM / ICRM, one metric table
    icrm sft    [--config cfg.yaml] [--field value ...]   fine-tune the generator on the chosen responses only
    icrm eval   --model DIR --eval_file F [--bon_file F]   pairwise accuracy, margin, per-token reward statistics;
                                                           process metrics where F has prefix values
    icrm score  --model DIR --input F [--output F]         per-response and per-token rewards as JSONL
    icrm export --model DIR --output DIR                   HF <Arch>ForSequenceClassification folder

``train`` and ``sft`` take every :class:`~icrm.config.RewardConfig` field as ``--field``;
YAML values come first, command-line values override them.

A fault the user can fix ends the command with one line, ``icrm: error: <message>``, and
exit code 2 (as argparse does); ``--debug`` (or ``ICRM_DEBUG=1``) shows the traceback instead.
Warnings print as ``icrm: warning: <message>``. Ctrl-C (or SIGTERM) during training saves a
checkpoint and ends with one line saying how to continue, exit code 130 (143 for SIGTERM).
Values may be negative numbers (``--learning_rate -1e-3`` reaches the field's range check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys

from .config import RewardConfig
from .io_safety import IcrmError
from .loop import TrainingInterrupted


def _config_parser(sub, name: str, help_text: str, description: str):
    parser = sub.add_parser(name, help=help_text, description=description,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of RewardConfig fields (command-line flags override it)")
    for f in dataclasses.fields(RewardConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        # Values stay strings here; RewardConfig.from_dict coerces and validates them.
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar=str(f.type).upper()
                            .replace(" ", ""), help=f"{f.metadata.get('help', '')} (default: {default!r})")
    return parser


def config_from_args(ns: argparse.Namespace) -> RewardConfig:
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    overrides = {k: v for k, v in vars(ns).items() if k in names}
    if ns.config:
        return RewardConfig.from_yaml(ns.config, overrides)
    return RewardConfig.from_dict(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icrm", description="ICRM reward-model training (arXiv 2506.09096) on icrm_kernels.")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("ICRM_DEBUG", "") not in ("", "0"),
                        help="show the traceback of an error (also: ICRM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sft,eval,score,export}")
    _config_parser(sub, "train", "train a reward model (default: the tiny built-in job, BT vs GRM vs ICRM)",
                   "Train an ICRM reward model. With no arguments: SFT the tiny built-in generator on the shipped "
                   "process task, train the BT, GRM and ICRM arms from the same start, and print one table of "
                   "pairwise accuracy and the process metrics; outputs under runs/icrm. Set --run_sft false / "
                   "--compare_bt false for a single reward-model run (--arm picks its objective).")
    _config_parser(sub, "sft", "fine-tune the generator on the chosen responses (stage 1)",
                   "Supervised fine-tuning of a causal LM on prompt + chosen response (labels on the response), "
                   "saved as a Hugging Face folder in <output_dir>/final, to serve as ICRM's generator.")

    ev = sub.add_parser("eval", help="pairwise accuracy and reward statistics of a trained reward model",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--model", required=True, help="a reward-model folder (a run's final/ or checkpoint-N/ with full weights)")
    ev.add_argument("--eval_file", default=None, help="preference data to evaluate on (required; e.g. "
                    "icrm/data/process_eval.jsonl, the shipped task's held-out pairs)")
    ev.add_argument("--bon_file", default=None, help="best-of-N sets {prompt, responses, correct} (e.g. "
                    "icrm/data/process_bon.jsonl): adds bon_accuracy")
    ev.add_argument("--max_length", type=int, default=RewardConfig.__dataclass_fields__["max_length"].default)
    ev.add_argument("--batch_size", type=int, default=64, help="pairs per batch")
    ev.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"))
    ev.add_argument("--disable_tqdm", action="store_true", help="no progress bar (it is off anyway when stderr "
                    "is not a terminal)")

    sc = sub.add_parser("score", help="per-response and per-token rewards for JSONL rows",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument("--model", required=True, help="a reward-model folder")
    sc.add_argument("--input", required=True, help="JSONL with 'prompt' + 'response' (or 'chosen'/'rejected' pairs, or 'messages')")
    sc.add_argument("--output", default="-", help="output JSONL ('-': stdout); written in full or not at all")
    sc.add_argument("--max_length", type=int, default=RewardConfig.__dataclass_fields__["max_length"].default)
    sc.add_argument("--batch_size", type=int, default=64, help="responses per forward")
    sc.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"))
    sc.add_argument("--disable_tqdm", action="store_true", help="no progress bar (it is off anyway when stderr "
                    "is not a terminal)")

    ex = sub.add_parser("export", help="save as a Hugging Face <Arch>ForSequenceClassification folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("--model", required=True, help="a reward-model folder")
    ex.add_argument("--output", required=True, help="destination folder, new or empty (loadable with AutoModelForSequenceClassification)")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it is swapped under test capture)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def negative_values_attached(argv: list[str]) -> list[str]:
    """``--field -1e-3`` -> ``--field=-1e-3``: argparse reads a negative number written with an
    exponent (or ``-inf``) as an unknown flag; attached, it reaches the field's own check."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and _is_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    ns = build_parser().parse_args(negative_values_attached(sys.argv[1:] if argv is None else list(argv)))
    logger = logging.getLogger("icrm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("icrm: warning: %(message)s"))  # the package logs warnings only
        logger.addHandler(handler)
    try:
        if ns.command == "train":
            from .pipeline import run_main_job

            run_main_job(config_from_args(ns))
        elif ns.command == "sft":
            from .checkpoint import prepare_output_dir
            from .trainers import SFTTrainer

            cfg = config_from_args(ns)
            # Checked before the model is built; train() repeats it and applies overwrite_output_dir.
            prepare_output_dir(cfg.output_dir, resuming=bool(cfg.resume_from_checkpoint),
                               overwrite=cfg.overwrite_output_dir, apply=False)
            trainer = SFTTrainer(args=cfg)
            result = trainer.train()
            print(json.dumps({**result, "model_dir": trainer.save_model()}))
        elif ns.command == "eval":
            from .inference import evaluate_file

            if ns.eval_file is None:
                raise IcrmError("eval: --eval_file is required: the preference file to evaluate on (the shipped "
                                "task's held-out pairs are icrm/data/process_eval.jsonl)")
            print(json.dumps(evaluate_file(ns.model, ns.eval_file, max_length=ns.max_length,
                                           batch_size=ns.batch_size, backend=ns.kernels,
                                           bon_file=ns.bon_file, disable_tqdm=ns.disable_tqdm), indent=1))
        elif ns.command == "score":
            from .inference import score_file

            score_file(ns.model, ns.input, ns.output, max_length=ns.max_length, backend=ns.kernels,
                       batch_size=ns.batch_size, disable_tqdm=ns.disable_tqdm)
        elif ns.command == "export":
            from .io_safety import atomic_path, refuse_same_file
            from .model import export_sequence_classification, load_reward_model

            refuse_same_file(ns.model, ns.output, "--output")
            if os.path.exists(ns.output) and (not os.path.isdir(ns.output) or os.listdir(ns.output)):
                raise IcrmError(f"--output {ns.output} exists and is not an empty folder; choose a new folder")
            rm, tokenizer = load_reward_model(ns.model, backend="reference")
            with atomic_path(ns.output, directory=True) as tmp:
                export_sequence_classification(rm, tokenizer, tmp)
            print(ns.output)
    except TrainingInterrupted as exc:
        if ns.debug:
            raise
        print(f"icrm: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print("icrm: interrupted outside a training step; checkpoints already written are kept", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, NotImplementedError) as exc:  # IcrmError is a ValueError
        if ns.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"icrm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
