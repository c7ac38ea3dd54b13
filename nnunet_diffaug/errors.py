"""One exception type for every refusal: the console scripts print its message, not a traceback."""


class DiffAugError(RuntimeError):
    """Bad input or a state we refuse to work in. The message names the file and the problem."""
