#!/usr/bin/env python3
"""wechatpy against `touchctl sandbox`: the answers a real client expects, as CHANNELS.md 5.1 points
it at another base URL (subclasses overriding API_BASE_URL and fetch_access_token).

    python3 tests/conformance/wechatpy_check.py BASE OA_APPID OA_SECRET OA_TEMPLATE_ID \
        WECOM_CORPID WECOM_SECRET WECOM_AGENTID WECOM_CONTACT_SECRET

Works with wechatpy 1.8.x (WeCom client in `wechatpy.enterprise`) and 2.x (`wechatpy.work`).
Prints one `ok ...` line per check; exits 0 when all pass, 1 on the first failure, 3 when wechatpy
is not installed.
"""

import json
import sys
import urllib.request

try:
    import wechatpy
    from wechatpy import WeChatClient
    from wechatpy.exceptions import WeChatClientException

    try:
        from wechatpy.work import WeChatClient as WorkClient
    except ImportError:
        from wechatpy.enterprise import WeChatClient as WorkClient
except ImportError as e:
    print("wechatpy is not installed (%s): python3 -m pip install wechatpy==1.8.18" % e)
    sys.exit(3)

(BASE, OA_APPID, OA_SECRET, OA_TEMPLATE, CORPID, WECOM_SECRET, AGENTID, CONTACT_SECRET) = sys.argv[1:9]


class SandboxOA(WeChatClient):
    API_BASE_URL = BASE + "/cgi-bin/"

    def fetch_access_token(self):
        return self._fetch_access_token(
            url=BASE + "/cgi-bin/token",
            params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
        )


class SandboxWork(WorkClient):
    API_BASE_URL = BASE + "/cgi-bin/"

    def fetch_access_token(self):
        return self._fetch_access_token(
            url=BASE + "/cgi-bin/gettoken",
            params={"corpid": self.corp_id, "corpsecret": self.secret},
        )


def check(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)
    print("ok " + what)


def errcode_of(call):
    try:
        call()
    except WeChatClientException as e:
        return e.errcode
    return "no exception"


def faults(rules):
    req = urllib.request.Request(BASE + "/_sandbox/faults", data=json.dumps(rules).encode(), method="POST")
    with urllib.request.urlopen(req) as r:
        return json.load(r)


print("wechatpy " + wechatpy.__version__)

oa = SandboxOA(OA_APPID, OA_SECRET)
token = oa.fetch_access_token()
check(token.get("expires_in") == 7200 and "errcode" not in token, "OA token: access_token and expires_in, no errcode")
sent = oa.message.send_template(
    "oOpenid-wechatpy",
    OA_TEMPLATE,
    {"first": {"value": "您的订单已发货"}, "keyword1": {"value": "SF1234", "color": "#173177"}},
    url="https://m.example.com/orders",
)
check(sent["errcode"] == 0 and isinstance(sent["msgid"], int), "OA message.send_template: errcode 0, numeric msgid")

# The token expires: wechatpy fetches a new one on 42001 and sends again, once.
faults([{"channel": "oa", "action": "expire_tokens"}])
again = oa.message.send_template("oOpenid-wechatpy", OA_TEMPLATE, {"first": {"value": "again"}})
check(again["errcode"] == 0, "OA send after expire_tokens: wechatpy refreshed the token and retried")

code = errcode_of(lambda: SandboxOA(OA_APPID, "not-the-secret").fetch_access_token())
check(code == 40125, "OA wrong secret: WeChatClientException errcode 40125 (got %r)" % code)
code = errcode_of(lambda: SandboxOA("wx0000000000000000", OA_SECRET).fetch_access_token())
check(code == 40013, "OA unknown appid: WeChatClientException errcode 40013 (got %r)" % code)
code = errcode_of(lambda: oa.message.send_template("oOpenid-wechatpy", "TM-not-registered", {"first": {"value": "x"}}))
check(code == 40037, "OA unknown template_id: WeChatClientException errcode 40037 (got %r)" % code)

work = SandboxWork(CORPID, WECOM_SECRET)
token = work.fetch_access_token()
# The same token while it is valid: expires_in counts down from 7200.
check(token.get("errcode") == 0 and 0 < token.get("expires_in", 0) <= 7200, "WeCom gettoken: errcode 0, expires_in")
sent = work.message.send_text(int(AGENTID), ["zhangsan", "lisi"], "新品上架")
check(sent["errcode"] == 0 and sent["invaliduser"] == "", "WeCom message.send_text: errcode 0, no invaliduser")

faults([{"channel": "wecom", "action": "fail_users", "ids": ["lisi"], "count": 1}])
sent = work.message.send_text(int(AGENTID), ["zhangsan", "lisi"], "新品上架")
check(sent["errcode"] == 0 and sent["invaliduser"] == "lisi", "WeCom send_text with a failed user: invaliduser lisi")

code = errcode_of(lambda: SandboxWork(CORPID, "not-the-secret").fetch_access_token())
check(code == 40001, "WeCom wrong secret: WeChatClientException errcode 40001 (got %r)" % code)
code = errcode_of(lambda: work.message.send_text(int(AGENTID) + 1, ["zhangsan"], "x"))
check(code == 40056, "WeCom another app's agentid: WeChatClientException errcode 40056 (got %r)" % code)

contact = SandboxWork(CORPID, CONTACT_SECRET)
made = contact.external_contact.add_msg_template(
    {"external_userid": ["wmExternal1", "wmExternal2"], "text": {"content": "会员日"}}
)
check(made["errcode"] == 0 and made["fail_list"] == [] and made["msgid"], "WeCom add_msg_template: msgid, empty fail_list")
code = errcode_of(lambda: work.external_contact.add_msg_template({"external_userid": ["wmExternal1"], "text": {"content": "x"}}))
check(code == 48002, "WeCom add_msg_template with the app's token: errcode 48002 (got %r)" % code)

print("all checks passed")
