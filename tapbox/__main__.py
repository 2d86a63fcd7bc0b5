import sys

from tapbox.cli import main

sys.exit(main())
