#!/usr/bin/env python3
"""A component_verify_ticket push sealed by wechatpy's own crypto (`wechatpy.crypto.WeChatCrypto`,
as `WeChatComponent` uses it), posted to a running `touchctl daemon` the way WeChat posts it:

    python3 tests/conformance/wechatpy_ticket_push.py EVENTS_URL TOKEN ENCODING_AES_KEY APP_ID TICKET

EVENTS_URL is the platform's event URL (`.../wechat/platforms/ID/events`). Prints `status: N` and
`body: ...` of the daemon's answer; exits 0 when it answered 200 `success`, 1 otherwise, 3 when
wechatpy (or what its crypto needs) is not installed.
"""

import sys
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import xmltodict
    from wechatpy.crypto import WeChatCrypto
except ImportError as e:
    print("wechatpy is not installed (%s): python3 -m pip install wechatpy==1.8.18" % e)
    sys.exit(3)

(URL, TOKEN, KEY, APP_ID, TICKET) = sys.argv[1:6]

timestamp = str(int(time.time()))
nonce = "1320562132"
push = (
    "<xml><AppId><![CDATA[%s]]></AppId><CreateTime>%s</CreateTime>"
    "<InfoType><![CDATA[component_verify_ticket]]></InfoType>"
    "<ComponentVerifyTicket><![CDATA[%s]]></ComponentVerifyTicket></xml>"
) % (APP_ID, timestamp, TICKET)
sealed = xmltodict.parse(WeChatCrypto(TOKEN, KEY, APP_ID).encrypt_message(push, nonce, timestamp))["xml"]
# What WeChat POSTs: the component app id and the ciphertext; the signature goes in the query.
body = "<xml><AppId><![CDATA[%s]]></AppId><Encrypt><![CDATA[%s]]></Encrypt></xml>" % (
    APP_ID,
    sealed["Encrypt"],
)
query = urllib.parse.urlencode(
    {
        "signature": "ignored-by-the-component-url",
        "timestamp": timestamp,
        "nonce": nonce,
        "encrypt_type": "aes",
        "msg_signature": sealed["MsgSignature"],
    }
)
request = urllib.request.Request(
    URL + "?" + query, data=body.encode("utf-8"), headers={"Content-Type": "text/xml"}
)
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        status, text = response.status, response.read(65536).decode("utf-8", "replace")
except urllib.error.HTTPError as e:
    status, text = e.code, e.read(65536).decode("utf-8", "replace")
print("status: %d" % status)
print("body: %s" % text)
sys.exit(0 if status == 200 and text == "success" else 1)
