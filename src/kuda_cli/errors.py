"""Errors a user can cause. The command prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (a config value, a path, a missing dataset): the message says what and the fix."""


class ConfigError(UserError):
    """A config key, option, type or value that cannot run."""
