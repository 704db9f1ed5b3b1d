"""`python -m netvlad_server` runs netvlad-server."""

import sys

from netvlad_server.main import main

sys.exit(main())
