import sys

from lamina_net.cli import main

sys.exit(main())
