"""The exceptions bio_ext raises.

Every error a user can cause derives from :class:`BioExtError` and from
``ValueError`` or ``TypeError``, so ``except ValueError`` keeps working for
callers that do not know bio_ext. Messages name the problem and the fix.
"""

from __future__ import annotations

from typing import Iterable, Union


class Problem(str):
    """One problem with a configuration: a ``path`` (``"options.feedback_lr"``, ``""`` for the whole)
    and a ``message``. It is the string ``"path: message"`` too, so it prints and compares as the
    problems always did, while code that re-roots a problem (the YAML runner prefixing its
    section) reads ``path`` instead of parsing the text."""

    path: str
    message: str

    def __new__(cls, path: str, message: str) -> "Problem":
        self = super().__new__(cls, f"{path}: {message}" if path else message)
        self.path, self.message = path, message
        return self

    def __reduce__(self):
        return (Problem, (self.path, self.message))

    def under(self, prefix: str) -> "Problem":
        """The same problem with ``prefix`` put before its path."""
        return Problem(f"{prefix}.{self.path}" if self.path else prefix, self.message)


class BioExtError(Exception):
    """Base class of every error raised by bio_ext."""


class ConfigError(BioExtError, ValueError):
    """One or more options are invalid. ``problems`` lists every one of them."""

    def __init__(self, problems: Iterable[Union[str, Problem]], *, what: str = "configuration"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem(s)):\n{lines}")


class ConfigTypeError(ConfigError, TypeError):
    """Options of the wrong kind: an unknown keyword argument, a non-mapping ``options``, a non-bool flag.
    A ``TypeError`` as Python raises for these, and a :class:`ConfigError` (a ``ValueError``) as every
    other option problem."""


class UnknownModeError(ConfigError):
    """The requested mode is not registered."""

    def __init__(self, mode: object, valid: Iterable[str]):
        self.mode = mode
        self.valid = sorted(valid)
        super().__init__(
            [f"unknown mode {mode!r}; valid modes are: {', '.join(self.valid)} "
             "(or register a new one with bio_ext.register_mode)"],
            what="mode",
        )


class ConversionError(BioExtError, ValueError):
    """The model cannot be converted as asked. The model was left unchanged."""


class AlreadyConvertedError(ConversionError):
    """The model (or one of its submodules) was converted already."""


class NothingToConvertError(ConversionError):
    """The model holds no layer that the selection and the mode can convert."""


class OutputDimError(ConversionError):
    """The size of the model's output cannot be found, or does not match."""


class AmbiguousOutputError(ConversionError):
    """The model's output depends directly on several layers, so the layer whose error direct modes take
    cannot be chosen for the user: pass ``output_layer=``."""


class OutputLayerError(ConversionError):
    """A forward showed that the output layer convert() guessed (it had no example input) is not the one the
    model's output comes from. Raised by that forward, before a backward could train on the wrong error."""


class StrictConversionError(ConversionError):
    """``convert(..., strict=True)`` found modules it would leave on plain backprop (see :mod:`bio_ext.audit`)."""


class UnsupportedModuleError(BioExtError, TypeError):
    """The model holds a module whose forward would bypass converted layers."""


class NestedForwardADError(BioExtError, ValueError):
    """GrAPE's forward would nest a forward-mode AD level in the user's own (see :mod:`bio_ext.modes.levels`)."""


class OutputTypeError(BioExtError, TypeError):
    """The model returned something the error tap cannot find the output tensor in."""


class FeedbackSignalError(BioExtError, ValueError):
    """A direct-feedback layer needed the output error and it was not available."""


class DataNotFoundError(BioExtError, ValueError):
    """A dataset's files are not where they were looked for. The message names the folder(s)
    searched, the exact file names expected there, and how to get them."""


class UnknownNameError(ConfigError):
    """A dataset or model name is not registered. ``valid`` lists the registered names."""

    def __init__(self, kind: str, name: object, valid: Iterable[str], *, hint: str = ""):
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(
            [f"unknown {kind} {name!r}; valid {kind} names are: {', '.join(self.valid)}"
             + (f" ({hint})" if hint else "")],
            what=kind,
        )


class InvalidOptionError(ConfigError):
    """Options given to a dataset loader or a model builder are unknown or have bad values.
    ``problems`` lists every one of them, each naming the valid options or values."""


class RunExistsError(BioExtError, ValueError):
    """A run folder holds results or a checkpoint already and resuming was not asked for."""


class NonFiniteLossError(BioExtError, ValueError):
    """The training loss became NaN or infinite. The message names the epoch and step and the last
    good checkpoint, which is kept."""


class PartitionError(ConversionError):
    """A model cannot be split into blocks as asked (see :mod:`bio_ext.blockwise`). The model was left unchanged."""


class BioExtWarning(UserWarning):
    """Something bio_ext did as asked but that is likely not what was meant (a module left on backprop, an
    ``exclude`` pattern that matches nothing, an option the mode ignores). Filter it with
    ``warnings.filterwarnings("error", category=bio_ext.errors.BioExtWarning)`` to make it an error."""
