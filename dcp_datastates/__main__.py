import sys

from dcp_datastates.cli import main

sys.exit(main())
