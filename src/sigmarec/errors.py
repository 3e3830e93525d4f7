"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with 2."""


class SigmaError(Exception):
    """Base class: the message names the file / field / value at fault."""


class ConfigError(SigmaError):
    pass


class DataError(SigmaError):
    pass


class StageError(SigmaError):
    pass
