#!/usr/bin/env python3
"""A local webhook sink for custom touchpoints: prints every batch touchctl delivers and checks its
Standard Webhooks signature (standard library only).

    python3 examples/local/sink.py [--port 8641] [--secret-file secrets/sandbox/sms_signing_secret]

It listens on 127.0.0.1 (port 0 picks a free one; the port is printed first). Every request is
answered 200, or 401 when a signature does not verify. --fail-every N answers 503 to every Nth
request, to watch retries.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=8641)
parser.add_argument("--secret-file", default="secrets/sandbox/sms_signing_secret")
parser.add_argument("--fail-every", type=int, default=0)
args = parser.parse_args()

try:
    secret = open(args.secret_file).read().strip()
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
except OSError:
    key = None

count = 0


def verified(headers, body):
    if key is None or "webhook-signature" not in headers:
        return None
    signed = "%s.%s.%s" % (headers["webhook-id"], headers["webhook-timestamp"], body.decode())
    expected = base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        count += 1
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        ok = verified(self.headers, body)
        data = json.loads(body)
        batch = data.get("batch", {})
        print(
            "%s %s batch %s/%s: %d recipient(s), signature %s"
            % (
                self.headers.get("webhook-id"),
                data.get("touchpoint"),
                batch.get("index", 0) + 1,
                batch.get("count"),
                len(data.get("recipients", [])),
                {None: "absent", True: "verified", False: "INVALID"}[ok],
            ),
            flush=True,
        )
        if ok is False:
            self.send_response(401)
        elif args.fail_every and count % args.fail_every == 0:
            self.send_response(503)
        else:
            self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Sink)
print("sink listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    sys.exit(0)
