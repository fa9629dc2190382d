"""Load a page in headless Chromium through the DevTools protocol, as the
dashboard tests need it: the admin token sent as a browser sends it
(Authorization: Basic, any user), every request the page made recorded,
the DOM after load, and a full-page screenshot.

usage: browse.py CHROMIUM URL TOKEN SCREENSHOT.png
prints: {"dom": "...", "requests": ["http://...", ...]}
"""

import base64
import json
import re
import subprocess
import sys
import tempfile

from websockets.sync.client import connect


def main():
    chromium, url, token, screenshot = sys.argv[1:5]
    profile = tempfile.mkdtemp(prefix="tollgate-chromium-")
    browser = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=420,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = None
        for line in browser.stderr:
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                endpoint = found.group(1)
                break
        if endpoint is None:
            sys.exit("chromium did not open its DevTools endpoint")
        print(json.dumps(drive(endpoint, url, token, screenshot)))
    finally:
        browser.kill()
        browser.wait()


def drive(endpoint, url, token, screenshot):
    with connect(endpoint, max_size=None, open_timeout=30) as ws:
        ids = iter(range(1, 1_000_000))
        events = []

        def call(method, params=None, session=None):
            n = next(ids)
            message = {"id": n, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            ws.send(json.dumps(message))
            while True:
                reply = json.loads(ws.recv(timeout=60))
                if reply.get("id") == n:
                    if "error" in reply:
                        sys.exit(f"{method}: {reply['error']}")
                    return reply["result"]
                events.append(reply)

        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        call("Network.enable", session=session)
        call("Page.enable", session=session)
        basic = base64.b64encode(f"admin:{token}".encode()).decode()
        call("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {basic}"}}, session)
        call("Page.navigate", {"url": url}, session)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(json.loads(ws.recv(timeout=60)))
        dom = call(
            "Runtime.evaluate",
            {"expression": "document.documentElement.outerHTML", "returnByValue": True},
            session,
        )["result"]["value"]
        shot = call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session,
        )["data"]
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot))
        requests = [
            e["params"]["request"]["url"]
            for e in events
            if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
        ]
        return {"dom": dom, "requests": requests}


main()
