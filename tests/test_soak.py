"""The soak benchmark's short mode (bench/soak.py): it runs and checks; its figures are not asserted."""
import os
import subprocess
import sys

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "soak.py")


def test_soak_short_run_checks_every_message_and_stays_flat(tmp_path):
    out = tmp_path / "soak.json"
    for transport, messages in (("shm", 3000), ("tcp", 3000)):
        # Under AddressSanitizer freed memory waits in its quarantine (256 MB) before reuse: RSS grows by design.
        allowance = ["--rss-allowance-kib", str(300 * 1024)] if os.environ.get("LAMINA_NET_SANITIZED") else []
        proc = subprocess.run([sys.executable, SOAK, "--messages", str(messages), "--transports", transport,
                               "--json", str(out), *allowance], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "every message checked, resources flat" in proc.stdout
        import json

        records = json.loads(out.read_text())
        assert {r["rank"] for r in records} == {0, 1}
        assert all(r["messages"] == messages and r["transport"] == transport for r in records)
