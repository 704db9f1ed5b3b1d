"""`python -m netvlad_client.cli`: the same as `netvlad-client`."""

import sys

from netvlad_client.cli import main

sys.exit(main())
