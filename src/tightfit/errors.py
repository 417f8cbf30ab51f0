"""Errors that mean "what was passed in is invalid" (as opposed to a bug in tightfit).

Each also derives from the built-in type a caller would expect (TypeError, ValueError), so ordinary
``except ValueError`` keeps working; the command line reports any `UserError` as one line, exit status 2.
"""


class UserError(Exception):
    """Base class: the message says what was wrong and what would be valid."""


class LossError(UserError, TypeError):
    """No scalar loss could be found in, or computed from, the model output."""


class NothingToTrain(UserError, ValueError):
    """The training step has nothing to backpropagate (frozen model, no_grad, loss without grad)."""


class InvalidInput(UserError, TypeError):
    """An argument of the wrong kind (not a module, not an optimizer, ...)."""
