"""Errors raised by vitfold. Each names the problem and, where there is one, the fix.

The CLI turns every ``VitfoldError`` into a one-line message and exit code 2 (bad input) or 1
(a check failed); anything else is a bug and keeps its traceback.
"""


class VitfoldError(Exception):
    """Base class: bad input or a failed check, reported to the user without a traceback."""

    exit_code = 2


class SpecError(VitfoldError):
    """The model specification is invalid (unknown model, not a ViT, bad image size, bad checkpoint)."""


class ScheduleError(VitfoldError):
    """A token schedule is infeasible; the message names the block."""


class ExportError(VitfoldError):
    """Tracing to ONNX failed or produced a graph that breaks the export contract."""

    exit_code = 1


class FidelityError(VitfoldError):
    """A built or exported artifact disagrees with its torch reference beyond tolerance."""

    exit_code = 1


class PassError(VitfoldError):
    """A graph pass failed or changed the model's outputs beyond its declared tolerance."""

    exit_code = 1


class BackendUnavailable(VitfoldError):
    """The backend's Python package is not installed here; the message gives the install command."""


class ArtifactError(VitfoldError):
    """A build directory is missing, incomplete, or from an incompatible vitfold version."""
