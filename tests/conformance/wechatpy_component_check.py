#!/usr/bin/env python3
"""wechatpy's `WeChatComponent` against `touchctl sandbox` playing the open platform, unchanged but
for its base URLs (CHANNELS.md 5.1): a local receiver takes the sandbox's encrypted pushes through
wechatpy's own crypto (`parse_message`: the verify ticket is cached, an `authorized` push is
exchanged with `query_auth` right away), then the component creates a pre-auth code, the page's
authorise link is followed with urllib for an auth code, and the authorizer token is refreshed and
used for a template message.

    python3 tests/conformance/wechatpy_component_check.py BASE COMPONENT_APPID COMPONENT_SECRET \
        TOKEN ENCODING_AES_KEY OA_APPID TEMPLATE_ID

Prints one `ok ...` line per check; exits 0 when all pass, 1 on the first failure, 3 when wechatpy
is not installed.
"""

import http.server
import json
import queue
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

try:
    from wechatpy import WeChatComponent
    from wechatpy.exceptions import WeChatClientException
    from wechatpy.utils import check_signature
except ImportError as e:
    print("wechatpy is not installed (%s): python3 -m pip install wechatpy==1.8.18" % e)
    sys.exit(3)

(BASE, COMPONENT, SECRET, TOKEN, KEY, OA, TEMPLATE) = sys.argv[1:8]
REDIRECT = "http://127.0.0.1:9/wechat/platforms/open-platform/authorized?state=b-7"
PATIENCE = 60


def check(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)
    print("ok " + what)


class SandboxComponent(WeChatComponent):
    API_BASE_URL = BASE + "/cgi-bin"
    PRE_AUTH_URL = BASE + "/cgi-bin/componentloginpage"


component = SandboxComponent(COMPONENT, SECRET, TOKEN, KEY)
pushed = queue.Queue()


class Receiver(http.server.BaseHTTPRequestHandler):
    """The platform's event URL: every push through wechatpy's parse_message."""

    def do_POST(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        one = lambda k: q.get(k, [""])[0]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            # Raises InvalidSignatureException when the plain signature does not check.
            check_signature(TOKEN, one("signature"), one("timestamp"), one("nonce"))
            msg = component.parse_message(body, one("msg_signature"), one("timestamp"), one("nonce"))
            pushed.put((self.path, msg))
            answer = b"success"
        except Exception as e:  # reported by the main thread
            pushed.put((self.path, e))
            answer = b"error"
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def next_push(kind):
    path, msg = pushed.get(timeout=PATIENCE)
    if isinstance(msg, Exception):
        check(False, "wechatpy reads the %s push: %r" % (kind, msg))
    check(path.startswith("/open-platform/events?"), "the push URL names the platform: " + path)
    check(msg.type == kind, "a %s push arrives (got %s)" % (kind, msg.type))
    return msg


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    to = "http://127.0.0.1:%d/{platform}/events" % server.server_port

    req = urllib.request.Request(
        BASE + "/_sandbox/tickets", data=json.dumps({"to": to}).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=PATIENCE) as r:
        answer = json.loads(r.read())
    check(answer["pushed"][0]["status"] == "success", "the ticket push is answered success: %s" % answer)
    ticket = next_push("component_verify_ticket")
    check(
        component.component_verify_ticket == ticket.verify_ticket,
        "parse_message cached the verify ticket",
    )

    # get_pre_auth_url: create_preauthcode (which fetches the component token with the ticket).
    url = component.get_pre_auth_url(REDIRECT)
    check(component.session.get("component_access_token"), "a component token from the ticket")
    with urllib.request.urlopen(url + "&auth_type=1", timeout=PATIENCE) as r:
        page = r.read().decode("utf-8")
    check("授权 — touchctl sandbox" in page, "the authorisation page opens")
    link = re.search(r'id="authorise-%s" href="([^"]+)"' % re.escape(OA), page)
    check(link is not None, "the page lists " + OA)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(BASE + link.group(1).replace("&amp;", "&"), timeout=PATIENCE)
        check(False, "the authorise link redirects")
    except urllib.error.HTTPError as e:
        check(e.code == 302, "the authorise link redirects (302)")
        location = e.headers["Location"]
    back = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)
    auth_code = back["auth_code"][0]
    check(back["state"] == ["b-7"] and back["expires_in"] == ["600"], "the redirect keeps state, adds expires_in=600")

    # The authorized push: parse_message exchanges its code with query_auth.
    authorized = next_push("authorized")
    check(authorized.authorization_code == auth_code, "the push carries the redirect's auth code")
    info = authorized.query_auth_result["authorization_info"]
    check(info["authorizer_appid"] == OA, "query_auth names the account")
    granted = sorted(f["funcscope_category"]["id"] for f in info["func_info"])
    check(granted == [1, 2, 3, 4, 7, 11, 15, 24], "the eight permission sets are granted: %s" % granted)
    try:
        component.query_auth(auth_code)
        check(False, "an auth code is single use")
    except WeChatClientException as e:
        check(e.errcode == 61009, "a used auth code answers 61009 (got %s)" % e.errcode)

    # The authorizer token: refreshed through the component, then used as the OA's.
    client = component.get_client_by_appid(OA)
    client.API_BASE_URL = BASE + "/cgi-bin/"
    before = client.access_token
    result = client.fetch_access_token()
    check(result["authorizer_refresh_token"] == info["authorizer_refresh_token"], "the refresh token comes back unchanged")
    check(client.access_token != before, "fetch_access_token refreshed the authorizer token")
    sent = client.message.send_template("o-user-1", TEMPLATE, {"first": {"value": "你好"}})
    check(sent["errcode"] == 0 and sent["msgid"] > 0, "a template message is sent with the authorizer token")

    about = component.get_authorizer_info(OA)
    check(about["authorization_info"]["authorizer_appid"] == OA, "get_authorizer_info answers the account")
    server.shutdown()
    print("all checks passed")


main()
