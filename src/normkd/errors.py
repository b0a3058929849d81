"""User-facing error types: the CLI turns these into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, names); never a bug in normkd."""


class ConfigError(UserError):
    """A recipe or override that does not validate; the message names the key."""


class DataError(UserError):
    """A dataset that is missing, incomplete or corrupt; the message says what was expected where."""
