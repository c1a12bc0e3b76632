import logging
import sys

from control.stack.local import main

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sys.exit(main())
