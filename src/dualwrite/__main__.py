import sys

from dualwrite.cli import main

sys.exit(main())
