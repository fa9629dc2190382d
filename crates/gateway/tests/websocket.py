"""A WebSocket echo upstream and a client, both Python's `websockets`, for
crates/gateway/tests/proxy.rs: prints the echo server's port, reads the
gateway's address on stdin, then through the gateway opens a socket, opens a
second one while the first is open (the tenant's one concurrency slot is
taken: expect 429), closes the first, and opens a third (the slot is back)."""

import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus


async def echo(socket):
    async for message in socket:
        await socket.send(message)


def status_of(error):
    return error.response.status_code


async def main():
    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        gateway = (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()
        url = f"ws://{gateway}/chat"
        headers = {"x-tenant-id": "acme"}
        first = await connect(url, additional_headers=headers)
        await first.send("hello")
        print("echo", await first.recv(), flush=True)
        try:
            second = await connect(url, additional_headers=headers)
            print("second open", flush=True)
            await second.close()
        except InvalidStatus as e:
            print("second", status_of(e), e.response.headers.get("ratelimit", "-"), flush=True)
        await first.close()
        for _ in range(50):  # the gateway sees the close a moment later
            try:
                third = await connect(url, additional_headers=headers)
                await third.send("again")
                print("third", await third.recv(), flush=True)
                await third.close()
                break
            except InvalidStatus:
                await asyncio.sleep(0.05)
        else:
            print("third never admitted", flush=True)


asyncio.run(main())
