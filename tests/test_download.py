"""Safe downloads against a loopback HTTP server that can drop the connection half way."""
import http.server
import threading

import h5py
import pytest

import mopo


class FlakyServer:
    """Serves one payload; the first `drops` responses stop half way; Range is honoured unless told not to."""

    def __init__(self, payload, drops=0, honour_range=True):
        self.payload, self.drops, self.honour_range, self.ranges = payload, drops, honour_range, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start, header = 0, self.headers.get("Range")
                server.ranges.append(header)
                if header and server.honour_range:
                    start = int(header.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops > 0:
                    server.drops -= 1
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hopper_medium-v2.hdf5"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def make(payload, **kwargs):
        servers.append(FlakyServer(payload, **kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def test_dropped_connection_resumes_with_range(hopper_file, tmp_path, serve):
    payload = hopper_file.read_bytes()
    server = serve(payload, drops=1)
    dest = tmp_path / "hopper_medium-v2.hdf5"
    mopo.download(server.url, dest)
    assert dest.read_bytes() == payload
    assert server.ranges == [None, f"bytes={len(payload) // 2}-"]  # the second request asked only for the rest
    assert not dest.with_name(dest.name + ".part").exists()


def test_partial_download_is_kept_and_resumed_by_the_next_run(hopper_file, tmp_path, serve):
    payload = hopper_file.read_bytes()
    server = serve(payload, drops=10)
    dest = tmp_path / "hopper_medium-v2.hdf5"
    part = dest.with_name(dest.name + ".part")
    with pytest.raises(ConnectionError, match=f"could not download {server.url} to {dest}.*place it at {dest}"):
        mopo.download(server.url, dest, attempts=2)
    assert not dest.exists() and 0 < part.stat().st_size < len(payload)  # never a half file under the real name
    kept = part.stat().st_size
    server.drops = 0
    mopo.download(server.url, dest)
    assert dest.read_bytes() == payload
    assert server.ranges[-1] == f"bytes={kept}-"  # continued from the bytes already on disk


def test_server_without_range_support_restarts_cleanly(hopper_file, tmp_path, serve):
    payload = hopper_file.read_bytes()
    server = serve(payload, drops=1, honour_range=False)
    dest = tmp_path / "hopper_medium-v2.hdf5"
    mopo.download(server.url, dest)
    assert dest.read_bytes() == payload  # the 200 reply to the Range request overwrote the partial file


def test_corrupt_download_is_deleted_and_reported(tmp_path, serve):
    server = serve(b"<html>502 Bad Gateway</html>" * 100)
    dest = tmp_path / "hopper_medium-v2.hdf5"
    with pytest.raises(ValueError, match="not a valid D4RL file .*deleted it"):
        mopo.download(server.url, dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_download_missing_keys_is_deleted(hopper_file, tmp_path, serve):
    bad = tmp_path / "bad.hdf5"
    with h5py.File(hopper_file) as src, h5py.File(bad, "w") as dst:
        dst.create_dataset("observations", data=src["observations"][()])
    server = serve(bad.read_bytes())
    dest = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    with pytest.raises(ValueError, match="lacks key"):
        mopo.download(server.url, dest)
    assert not dest.exists()


def test_damaged_cache_file_is_reported_never_used(hopper_file, tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    cached = tmp_path / "hopper_medium-v2.hdf5"
    cached.write_bytes(hopper_file.read_bytes()[: hopper_file.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=f"not a readable hdf5 file .*; the cached file is damaged: .*`rm {cached}`"):
        mopo.get_dataset(mopo.make_task("hopper-medium-v2"), None, 11, 3)
    assert cached.exists()  # the user's file is reported, not silently deleted


def test_unreachable_host_names_url_and_cache(tmp_path):
    url = "http://127.0.0.1:9/hopper_medium-v2.hdf5"  # discard port: connection refused
    dest = tmp_path / "hopper_medium-v2.hdf5"
    with pytest.raises(ConnectionError, match=f"could not download {url} to {dest}"):
        mopo.download(url, dest, attempts=1)
