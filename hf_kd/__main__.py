"""`python -m hf_kd ...` (and `accelerate launch -m hf_kd train ...`) is `hf-kd ...`."""

import sys

from hf_kd.cli import main

if __name__ == "__main__":
    sys.exit(main())
