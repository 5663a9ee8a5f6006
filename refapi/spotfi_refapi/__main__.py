"""Command line `python3 -m spotfi_refapi [flags]`, described by --help and docs/refapi.md."""

import asyncio
import logging
import os
import sys

from . import config
from .errors import ConfigError, StoreError
from .service import run

log = logging.getLogger("spotfi_refapi")


def main(argv=None, environ=None):
    """Run the API. Return 2 on invalid options and 1 when it cannot start."""
    environ = os.environ if environ is None else environ
    try:
        settings = config.parse_settings(sys.argv[1:] if argv is None else argv, environ)
    except ConfigError as error:
        sys.stderr.write("spotfi-refapi: error: %s\n" % error)
        return 2

    logging.basicConfig(stream=sys.stderr, level=config.logging_level(settings.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("instance %s starting: broker %s, redis %s, database %s",
             settings.instance_id, settings.broker.url, config.redact_url(settings.redis_url),
             settings.database.url)
    try:
        asyncio.run(run(settings))
    except StoreError as error:
        log.error("cannot start: %s", error)
        return 1
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
