"""mmloom: curated interleaved multimodal datasets and multimodal diffusion training."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

VERBOSE_ENV = "MMLOOM_VERBOSE"


def verbose() -> bool:
    """`mmloom --verbose` (or MMLOOM_VERBOSE=1): show libraries' progress bars and
    warnings and Ray workers' logs, which a normal run keeps out of the terminal."""
    return _os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def progress_enabled(progress: bool) -> bool:
    """mmloom's own bars: on when asked and stderr is a terminal (a log file gets the
    summary lines, not carriage-return redraws)."""
    return bool(progress) and _sys.stderr.isatty()


def quiet_libraries() -> None:
    """Set before the libraries load (also inherited by Ray workers): no Hugging Face
    loading bars, only errors from transformers and diffusers."""
    if verbose():
        return
    for k, v in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                 ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                 ("NO_ALBUMENTATIONS_UPDATE", "1")):
        if k not in _os.environ:
            _os.environ[k] = v
            _QUIETED.append(k)


def set_verbose() -> None:
    """Undo ``quiet_libraries`` (run at import, before the command line is read)."""
    _os.environ[VERBOSE_ENV] = "1"
    while _QUIETED:
        _os.environ.pop(_QUIETED.pop(), None)


_QUIETED: list[str] = []
quiet_libraries()
