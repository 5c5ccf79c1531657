"""``python -m pyflannel.cni``: the same as the ``pyflannel-cni`` entry point."""

import sys

from pyflannel.cni.plugin import main

sys.exit(main())
