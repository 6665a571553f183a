"""The factory's error types: one place that says which failures are the user's and which are transient.

Every stage raises one of these (or a subclass defined next to the code that raises it). The Airflow layer
fails a task at once, without retries, on a :class:`UserError` (retrying cannot change a bad spec, an empty
extract or a gate refusal) and lets Airflow retry a :class:`TransientError`. The CLI exits with the class's
``exit_code``. Messages are user-facing and never hold patient data.

Exit codes (``synthfactory`` CLI):

====  ===================================================================
0     released (or spec valid)
1     anything else (a :class:`TransientError` says "re-run to resume")
2     invalid spec, usage or deployment setting (:class:`ConfigError`)
3     bad input: extract missing, empty, unusable (:class:`InputError`)
4     a gate refused: dataset quarantined, nothing released
5     the publisher refused the file set
====  ===================================================================
"""

from __future__ import annotations

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_INPUT, EXIT_GATE, EXIT_PUBLISH = 0, 1, 2, 3, 4, 5


class SynthFactoryError(Exception):
    """Base of every error the factory raises on purpose."""

    exit_code: int = EXIT_ERROR
    label: str = "error"          # the CLI's prefix for the message


class UserError(SynthFactoryError):
    """Deterministic: the same inputs fail the same way, so the task fails at once, without retries."""

    exit_code = EXIT_SPEC


class ConfigError(UserError):
    """The spec, a view, a run parameter or a deployment setting is wrong (names the field)."""

    exit_code = EXIT_SPEC
    label = "invalid spec"


class InputError(UserError):
    """The extract or table is missing, empty or unusable."""

    exit_code = EXIT_INPUT
    label = "bad input"


class RefusedError(UserError):
    """A gate or the publisher refused: nothing is released. Subclasses set the exit code."""


class TransientError(SynthFactoryError):
    """May succeed when retried (network, contention, a lost conditional write): Airflow retries it, and
    re-running the same CLI command resumes where it stopped."""

    exit_code = EXIT_ERROR
    label = "failed (re-run to resume)"


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError)


def exit_code_for(err: BaseException) -> int:
    """The CLI exit code of any exception (1 for one the factory did not raise on purpose)."""
    return err.exit_code if isinstance(err, SynthFactoryError) else EXIT_ERROR


def describe(err: BaseException) -> str:
    """``<label>: <message>`` as the CLI prints it."""
    label = err.label if isinstance(err, SynthFactoryError) else "error"
    return f"{label}: {err}"
