"""The ``medtransfer`` console script: the command list and dispatch, importing nothing heavy (``--help`` is instant).

``fit``, ``validate`` and ``test`` go to the LightningCLI in ``medtransfer.commands.fit``; every other command is a
typed ``run_<command>`` function that :mod:`medtransfer.commands.command_line` turns into its command line. The
``--help`` of the commands whose options need torch to describe comes from :mod:`medtransfer.commands.help_cache`.
"""

from __future__ import annotations

import sys

__all__ = ["COMMANDS", "COMMAND_HELP", "main", "print_commands", "warm_help_cache"]

#: Commands that are not Lightning's: name -> ``"module:function"``, the typed function that runs it.
COMMANDS = {
    name: f"medtransfer.commands.{name.replace('-', '_')}:run_{name.replace('-', '_')}"
    for name in ("evaluate", "predict", "compare", "baseline", "learning-curve", "search", "lr-find",
                 "explain-eval", "prepare", "serve")
}  # fmt: skip

#: ``medtransfer --help``: every command with one line.
COMMAND_HELP = {
    "fit": "train a model from a YAML config (checkpoints, MLflow run; --test_after_fit tests the best one)",
    "validate": "one validation epoch of a checkpoint (--ckpt_path), logged to its MLflow run",
    "test": "test a checkpoint: metrics, report figures and evaluate's table, logged to its MLflow run",
    "predict": "batch inference: a folder, glob or CSV of images to a CSV of decisions (and heatmaps)",
    "serve": "an HTTP endpoint on LitServe: POST an image (PNG, JPEG, TIFF, DICOM), get predict's row as JSON",
    "evaluate": "audit a predictions CSV (predict's, or made elsewhere) against a label file",
    "compare": "the runs of an MLflow experiment side by side, ranked by one metric",
    "baseline": "logistic regression on downsampled pixels or frozen backbone features: the yardstick",
    "learning-curve": "a metric against the training-set size, for several recipes and seeds",
    "search": "hyperparameter search over fit (Optuna grid or random), tracked in MLflow",
    "lr-find": "learning-rate finder for the head phase or the unfrozen phase, plot logged to MLflow",
    "explain-eval": "score heatmaps against boxes: pointing-game hit rate and IoU per method and layer",
    "prepare": "decode, crop and resize every split once into LitData's streaming format for fast training",
}


def print_commands() -> None:
    """The command list, one line each."""
    width = max(map(len, COMMAND_HELP))
    lines = ["usage: medtransfer <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMAND_HELP.items()]
    lines += ["", "medtransfer <command> --help lists a command's options."]
    print("\n".join(lines))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``medtransfer`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in ([], ["-h"], ["--help"]):
        print_commands()
        return
    from medtransfer.commands import help_cache  # light: the check below, and the cache's own imports

    if help_cache.is_cached_help(argv):
        help_cache.print_help(argv[0], lambda: _run(argv, args))  # exits, as argparse does after help
    _run(argv, args)


def warm_help_cache() -> None:
    """Store the ``--help`` of the commands whose options need torch to describe, in this one process (what
    ``make setup`` runs, so that the first ``medtransfer fit --help`` is already instant)."""
    from medtransfer.commands import help_cache

    stored = help_cache.warm(lambda argv: _run(argv, argv))
    print(f"medtransfer: --help of {', '.join(stored) or 'no command'} stored in {help_cache.cache_folder()}")


def _run(argv: list[str], args: list[str] | None) -> None:
    """Run the command ``argv`` names; ``args`` is what ``main`` was given (``None``: from ``sys.argv``)."""
    if argv[0] in COMMANDS:
        from medtransfer.commands.command_line import run_command

        run_command(COMMANDS[argv[0]], argv[1:], prog=f"medtransfer {argv[0]}")
        return
    from medtransfer.commands.fit import main as lightning_main

    lightning_main(args)  # None: Lightning reads sys.argv itself (a list beside it would be warned about)


if __name__ == "__main__":
    main()
