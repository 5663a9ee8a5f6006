"""Exceptions of the reference API. Each docstring states when the exception is raised."""


class RefapiError(Exception):
    """Base class of every error the reference API raises on purpose."""


class ConfigError(RefapiError):
    """Raised when an option (environment variable or flag) has an invalid value."""


class StoreError(RefapiError):
    """Raised when the SQL database cannot be reached or rejects a statement."""


class BrokerUnavailableError(RefapiError):
    """Raised when a message must be published while the MQTT broker is not connected."""
