"""``diffbir-infer``: restore a file or a folder of images with the two-stage pipeline.

Arguments -> config -> runner: the command line (:mod:`.arguments`, generated from
:mod:`.options`) and the preset make an :class:`~.options.InferenceConfig`
(:func:`~.presets.resolve_config`), and the :class:`~.runner.Runner` does the rest. Bad input
files are reported and skipped, outputs are written atomically and existing ones are skipped
(so an interrupted run resumes), and each image's seed is derived from the run seed and its path
relative to the input (``--seed-mode official`` draws from one stream in file order instead, as
the official code).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from diffbir.captioning import CaptionerUnavailableError
from diffbir.checkpoint import CheckpointError
from diffbir.pipeline.arguments import parse
from diffbir.pipeline.loading import WrongVersionError
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.presets import resolve_config
from diffbir.pipeline.runner import EXIT_INTERRUPTED, Runner
from diffbir.weights import MissingWeightsError

EXIT_USAGE = 2


def config_from_argv(argv: Sequence[str] | None = None) -> tuple[InferenceConfig, RunOptions]:
    """The config and run options of a command line (ValueError names the bad flag or key)."""
    invocation = parse(argv)
    cfg, _ = resolve_config(invocation.preset, invocation.overrides, invocation.flags)
    return cfg, invocation.run


# What a user can cause: the message is printed and the command exits with :func:`exit_status`.
USER_ERRORS = (ValueError, FileNotFoundError, CaptionerUnavailableError)


def exit_status(err: Exception) -> int:
    """The exit status of a user error: 1 for weight files missing or unreadable or the
    captioner unavailable, 2 for bad arguments, a bad config or a weight file of another
    version."""
    if isinstance(err, (MissingWeightsError, CaptionerUnavailableError)):
        return 1
    if isinstance(err, WrongVersionError):
        return EXIT_USAGE
    if isinstance(err, CheckpointError):
        return 1
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-infer``; returns the exit status (0 done, 1 some inputs failed,
    weights missing or unreadable, or the captioner unavailable, 2 bad arguments, config or
    weight-file version, 130 interrupted)."""
    try:
        cfg, run = config_from_argv(argv)
        return Runner(cfg, run).run().status
    except KeyboardInterrupt:
        print("interrupted (before any image was restored)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status(err)
