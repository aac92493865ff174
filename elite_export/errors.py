"""The one user-error exception. The CLIs turn it into one line on stderr and exit code 1;
anything else is a bug and keeps its traceback."""


class EliteError(Exception):
    """Bad input from the user: a missing file, a wrong checkpoint, an unsupported size..."""
