"""The soak script for about a minute (slow): correctness under mixed traffic, flat memory.

No timing is asserted; the latency table is printed for the log. The 10-minute run and its numbers
are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_one_minute_soak_keeps_every_promise(tmp_path, tiny_weights):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "60", "--workers", "3", "--interval", "10",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    report = json.loads(out.read_text())
    valid, invalid = report["valid"], report["invalid"]
    assert valid["count"] > 100 and valid["errors"] == 0, valid["first_errors"]
    assert valid["wrong_rows"] == 0 and valid["codes"] == {"OK": valid["count"]}
    assert invalid["count"] > 30 and invalid["not_invalid_argument"] == 0, invalid["first_others"]
    assert set(report["abandoned"]["codes"]) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert report["server_exit_clean"] and report["workers_finished"] == 3
    rss = report["rss_mib"]
    # Generous: a leak of request payloads at this rate would add hundreds of MiB per minute.
    assert rss["last"] - rss["after_first_interval"] < 100, rss
    assert result.returncode == 0, result.stdout + result.stderr
    # The references the workers checked against are the network's own descriptors.
    from netvlad_server.network import NetVLADNetwork

    network = NetVLADNetwork(tiny_weights)
    for key, image in enumerate(_soak_module().make_pool()):
        np.testing.assert_allclose(report["references"][f"{key}/raw"], network(image)[0],
                                   atol=1e-5)
