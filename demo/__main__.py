"""`python -m mimkit.demo [options]` (what `mimkit demo` hands over to)."""
import sys

from mimkit.demo.chain import main

if __name__ == "__main__":
    sys.exit(main())
