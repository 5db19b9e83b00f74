#!/usr/bin/env bash
# Makes the pull-request branch of the README's review example: from the current commit, a branch
# (default `sms-v2`) on which the SMS touchpoint moves to the production gateway, the push
# notification's title changes and the WeCom file moves to a folder of its own; committed, so that
# `touchctl plan --base main` has something to review. Run it from the repository root.
set -euo pipefail

branch=${1:-sms-v2}
if ! git diff --quiet HEAD -- touchpoints; then
    echo "touchpoints/ has uncommitted changes: commit or stash them first" >&2
    exit 1
fi
if git rev-parse --verify --quiet "refs/heads/$branch" >/dev/null; then
    echo "branch $branch exists already: delete it (git branch -D $branch) or name another" >&2
    exit 1
fi

git switch --quiet --create "$branch"
# `sed -i.bak` then removing the copy works with both GNU and BSD sed.
sed -i.bak \
    -e 's|^url = .*|url = "https://sms-gw.example.com/v2/send"|' \
    -e '/^allow_insecure = /d' \
    touchpoints/custom/sms.toml
sed -i.bak -e 's/^title = "会员专享"/title = "会员日专享"/' touchpoints/channels/getui.toml
rm -f touchpoints/custom/sms.toml.bak touchpoints/channels/getui.toml.bak
mkdir -p touchpoints/wecom
git mv touchpoints/channels/wecom.toml touchpoints/wecom/stores.toml
git commit --quiet --all --message "sms: production gateway; push title; WeCom file moved"
echo "on branch $branch: sms to the production gateway, a new push title, the WeCom file moved"
