"""Downloads (one attempt into a .part file, checked, then renamed) against a loopback HTTP server that can drop the
connection half way, and a Ctrl-C or SIGTERM while the data downloads."""
import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import pytest

import mopo

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """Serves one payload; with `drop` each response stops half way; with `signal_pid` it sends that process a signal
    once half the payload is out, then waits for the client to hang up."""

    def __init__(self, payload, drop=False, signal_pid=None):
        self.payload, self.drop, self.signal_pid, self.requests = payload, drop, signal_pid, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                half = len(server.payload) // 2
                self.wfile.write(server.payload[:half] if server.drop or server.signal_pid else server.payload)
                self.wfile.flush()
                if server.signal_pid:
                    os.kill(server.signal_pid[0], server.signal_pid[1])
                    self.rfile.read()  # until the client closes the connection
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{file}}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def make(payload, **kwargs):
        servers.append(Server(payload, **kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def test_download_goes_to_the_cache_under_its_name_only_when_complete(hopper_file, tmp_path, monkeypatch, serve):
    server = serve(hopper_file.read_bytes())
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(mopo, "D4RL_URL", server.url)
    data = mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert len(data["rewards"]) == 2000 and server.requests == 1
    assert (tmp_path / "hopper_medium-v2.hdf5").read_bytes() == hopper_file.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["hopper_medium-v2.hdf5"]  # no .part left beside it


def test_dropped_connection_is_an_error_naming_url_cache_path_and_fix(hopper_file, tmp_path, monkeypatch, serve):
    server = serve(hopper_file.read_bytes(), drop=True)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(mopo, "D4RL_URL", server.url)
    with pytest.raises(ConnectionError, match=f"could not download {server.url.format(file='hopper_medium-v2.hdf5')} "
                                              f".*place the file at {tmp_path / 'hopper_medium-v2.hdf5'} by hand"):
        mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert list(tmp_path.iterdir()) == [] and server.requests == 1  # one attempt; nothing half-written is kept


def test_corrupt_download_is_deleted_and_reported(tmp_path, monkeypatch, serve):
    server = serve(b"<html>502 Bad Gateway</html>" * 100)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(mopo, "D4RL_URL", server.url)
    with pytest.raises(ValueError, match="not a valid D4RL file .*deleted it"):
        mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert list(tmp_path.iterdir()) == []


def test_download_missing_keys_is_deleted(hopper_file, tmp_path, monkeypatch, serve):
    bad = tmp_path / "bad.hdf5"
    with h5py.File(hopper_file) as src, h5py.File(bad, "w") as dst:
        dst.create_dataset("observations", data=src["observations"][()])
    server = serve(bad.read_bytes())
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(mopo, "D4RL_URL", server.url)
    with pytest.raises(ValueError, match="lacks key"):
        mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cache_file_is_reported_never_used(hopper_file, tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    cached = tmp_path / "hopper_medium-v2.hdf5"
    cached.write_bytes(hopper_file.read_bytes()[: hopper_file.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=f"not a readable hdf5 file .*the cached file is damaged: rm {cached}"):
        mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert cached.exists()  # the user's file is reported, not silently deleted


def test_unreachable_host_names_url_and_cache(tmp_path):
    url = "http://127.0.0.1:9/hopper_medium-v2.hdf5"  # discard port: connection refused
    with pytest.raises(ConnectionError, match=f"could not download {url} .*place the file at "
                                              f"{tmp_path / 'hopper_medium-v2.hdf5'} by hand"):
        mopo.download(url, tmp_path / "hopper_medium-v2.hdf5")
    assert list(tmp_path.iterdir()) == []


# mopo.py's command line with D4RL's URL pointed at a loopback server
POINTED = """
import sys
sys.path.insert(0, {root!r})
import mopo, tyro
mopo.D4RL_URL = {url!r}
try:
    mopo.main(tyro.cli(mopo.Args))
except (ValueError, OSError, ImportError, FloatingPointError) as e:
    raise SystemExit(f"error: {{e}}")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_data_downloads_stops_the_run_then(sig, hopper_file, tmp_path, serve):
    """The server signals the run once half the file is out and keeps the connection open: the run stops at once
    (exit 143), leaves no part file and no run folder."""
    target = []
    server = serve(hopper_file.read_bytes(), signal_pid=target)
    code = POINTED.format(root=str(ROOT), url=server.url)
    proc = subprocess.Popen([sys.executable, "-c", code, "--env-id", "hopper-medium-v2", "--epochs", "1"], cwd=tmp_path,
                            env={**os.environ, "D4RL_DATASET_DIR": str(tmp_path / "cache")}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    target += [proc.pid, sig]  # long before the child's request: it first imports torch and gymnasium
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert f"{sig.name}: stopped; nothing new was saved" in out and "Traceback" not in err
    assert server.requests == 1 and list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "runs").exists()
