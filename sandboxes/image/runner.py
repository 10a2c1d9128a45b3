"""The sandbox runner's entry script: PID 1 of every sandbox container. The protocol and
the run are in ``_runner_main`` (whose docstring documents them); this stays small because a
script is compiled on every start while modules load from the bytecode built into the image.
"""

import os
import sys

# -I leaves the script's directory off sys.path; the runner's modules live beside it (and
# the program's process takes it off again). Underscore names: a user's module of the same
# name cannot be shadowed by one of ours already imported.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner_main import main

sys.exit(main())
