"""Real-model benchmark (fit and erase on a ResNet-size CNN); see ``ssse.experiments.model_bench``
(also ``ssse bench --model``)."""

import sys

from ssse.experiments.model_bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
