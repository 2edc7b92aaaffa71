"""Reaching the Hub: an endpoint that never answers, or answers 500, is one line within a bounded time."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_endpoint():
    """Accepts connections (the kernel completes the handshake) and never sends a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def failing_endpoint():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("endpoint", ["silent_endpoint", "failing_endpoint"])
def test_unanswering_hub_is_one_line_in_bounded_time(request, tmp_path, endpoint):
    env = {**os.environ, "HF_ENDPOINT": request.getfixturevalue(endpoint), "HF_HOME": str(tmp_path / "hf"),
           "PHI3SKIP_HUB_TIMEOUT": "2", "OMP_NUM_THREADS": "1"}
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    # Unbounded, the silent endpoint hangs the command for many minutes: past this timeout.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", "no-org/no-model",
                        "--show-skips"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-org/no-model" in lines[0] and "Traceback" not in r.stderr, r.stderr
