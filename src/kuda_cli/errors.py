"""Errors a user can cause. The command prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (a config value, a path, a missing dataset): the message says what and the fix."""


class ConfigError(UserError):
    """A config key, option, type or value that cannot run."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, `timeout`, `kill`): raised in the main thread so that
    the run records why and when it stopped before the process exits. Not an Exception: nothing
    that handles errors may swallow it."""
