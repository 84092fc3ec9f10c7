"""Errors a user can cause. The CLI turns them into one line and exit code 2, the service into a 4xx."""


class SegError(Exception):
    """A problem with the user's input: a file, an image, a config value or an option."""


class ConfigError(SegError):
    """A config file or override that does not validate."""


class ImageError(SegError):
    """An image that cannot be read or does not fit the model."""


class DataError(SegError):
    """A data set that is missing, empty or inconsistent (sizes, mask values)."""
