"""One redaction for every URI dfmvr prints, logs, tags or saves (docs/reliability.md)."""

from __future__ import annotations

import pytest

from dfmvr.tracking import redact, redact_all

SECRET = "pa55w0rd"


@pytest.mark.parametrize("url, expected", [
    (f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow", "postgresql://db.internal:5432/mlflow"),
    (f"mysql+pymysql://root:{SECRET}@10.0.0.5/mlflow", "mysql+pymysql://10.0.0.5/mlflow"),
    (f"http://alice:{SECRET}@mlflow.example:5000", "http://mlflow.example:5000"),
    (f"https://alice:{SECRET}@MLflow.Example/path", "https://MLflow.Example/path"),
    (f"s3://bucket/shards?X-Amz-Security-Token={SECRET}&X-Amz-Signature={SECRET}",
     "s3://bucket/shards?X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("not a url: user:pw@host", "not a url: user:pw@host"),
])
def test_redact(url, expected):
    assert redact(url) == expected


def test_redact_all_walks_configs():
    cfg = {"tracking": {"tracking_uri": f"postgresql://u:{SECRET}@h/db"}, "data": {"url": "s3://b/p", "n": 3},
           "views": [f"http://a:{SECRET}@h"]}
    out = redact_all(cfg)
    assert SECRET not in repr(out)
    assert out["data"] == {"url": "s3://b/p", "n": 3}


def test_preflight_reaches_a_server_given_with_credentials():
    """``http://user:pw@host`` reaches ``host`` (not "pw@host") and sends the credentials as a
    Basic header, as MLflow's own client does."""
    import base64
    import http.server
    import threading

    from dfmvr.tracking import check_reachable

    seen = {}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen["path"], seen["auth"] = self.path, self.headers.get("Authorization")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://alice:{SECRET}@127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    assert seen["path"] == "/health"
    assert seen["auth"] == "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()


def test_redact_all_finds_urls_inside_text():
    """A command line or an overrides note carries URLs after ``key=``: they are redacted too."""
    note = f"preset=tiny tracking.tracking_uri=postgresql://u:{SECRET}@db/mlflow data.url=s3://b/p?token={SECRET}"
    out = redact_all(note)
    assert SECRET not in out
    assert "tracking.tracking_uri=postgresql://db/mlflow" in out and "data.url=s3://b/p?token=***" in out
