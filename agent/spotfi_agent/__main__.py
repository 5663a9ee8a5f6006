import sys

from spotfi_agent.cli import main

sys.exit(main())
