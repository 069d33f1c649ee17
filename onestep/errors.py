"""The one error type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserInputError(ValueError):
    """A problem with what the user gave us (paths, configs, shapes, values), explained in one line."""


class EvalError(UserInputError):
    """Evaluation cannot run as asked (bad images, reference or feature setup); the message is one line."""


class PeerLost(RuntimeError):
    """Another process of a multi-process run died, and a collective call of this one failed: it stopped (one line)."""
