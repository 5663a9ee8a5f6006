#!/usr/bin/python3
"""Command line of spotfi-agent: run, check and info (see `spotfi-agent --help`)."""

import sys

from spotfi_agent.cli import main

sys.exit(main())
