"""`python -m jaxquant` runs the `jaxquant` command."""

import sys

from jaxquant.cli import main

sys.exit(main())
