"""``python -m lamina_net.plan``: the plan command without the other subcommands."""
import sys

from lamina_net.plan.cli import main

sys.exit(main())
