"""``python -m swarmtrain.peer`` is the ``swarmtrain`` command."""
import sys

from swarmtrain.peer.cli import main

sys.exit(main())
