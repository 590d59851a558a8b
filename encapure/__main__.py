import sys

from encapure.cli import main

sys.exit(main())
