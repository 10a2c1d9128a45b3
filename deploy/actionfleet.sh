#!/bin/sh
# `actionfleet` inside the fleet image: ActionFleet runs from source on PYTHONPATH
# (see deploy/Dockerfile), so the console script is this one line.
exec python3 -m workers.ops.cli "$@"
