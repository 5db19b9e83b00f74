#!/usr/bin/env python3
"""wechatpy's own message crypto (WXBizMsgCrypt, `wechatpy.crypto.WeChatCrypto`) against touchctl's
(`channel::open_platform::crypt`), both ways:

    python3 tests/conformance/wechat_crypt_check.py TOKEN ENCODING_AES_KEY APP_ID TIMESTAMP NONCE \
        MSG_SIGNATURE BODY EXPECTED

BODY and MSG_SIGNATURE are what touchctl sealed (the POST body WeChat sends and its signature);
EXPECTED is the message they hold. Checks that wechatpy opens them to EXPECTED, then seals EXPECTED
itself and prints `sealed: {"body": ..., "msg_signature": ...}` for touchctl to open.
Works with wechatpy 1.8.x and 2.x. Prints one `ok ...` line per check; exits 0 when all pass,
1 on the first failure, 3 when wechatpy (or what its crypto needs) is not installed.
"""

import json
import sys

try:
    import xmltodict
    from wechatpy.crypto import WeChatCrypto
    from wechatpy.exceptions import InvalidSignatureException
except ImportError as e:
    print("wechatpy is not installed (%s): python3 -m pip install wechatpy==1.8.18" % e)
    sys.exit(3)

(TOKEN, KEY, APP_ID, TIMESTAMP, NONCE, SIGNATURE, BODY, EXPECTED) = sys.argv[1:9]


def fail(what):
    print("FAILED: " + what)
    sys.exit(1)


crypto = WeChatCrypto(TOKEN, KEY, APP_ID)

try:
    opened = crypto.decrypt_message(BODY, SIGNATURE, TIMESTAMP, NONCE)
except Exception as e:  # any refusal is a failure of the check, named
    fail("wechatpy refused what touchctl sealed: %r" % e)
if opened != EXPECTED:
    fail("wechatpy opened %r, expected %r" % (opened, EXPECTED))
print("ok wechatpy opens what touchctl sealed")

try:
    crypto.decrypt_message(BODY, "0" * 40, TIMESTAMP, NONCE)
    fail("wechatpy accepted touchctl's body under another signature")
except InvalidSignatureException:
    print("ok wechatpy refuses touchctl's body under another signature")

reply = crypto.encrypt_message(EXPECTED, NONCE, TIMESTAMP)
signature = xmltodict.parse(reply)["xml"]["MsgSignature"]
print("sealed: " + json.dumps({"body": reply, "msg_signature": signature}))
print("all checks passed")
