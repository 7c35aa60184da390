#!/usr/bin/env python3
"""The downstream HL7 system the gateway forwards to, on python-hl7's MLLP server.

    mllp_peer.py --port P --log FILE [--cert C --key K --ca CA] [--refuse ID,...]

python-hl7 (`hl7.mllp.start_hl7_server`, asyncio) does the MLLP framing; with --cert it
runs in TLS and requires a client certificate issued by --ca (mutual TLS, as a hospital
interface engine would). Every message received is appended to --log as one line,
`<MSH-10> <base64 of the exact bytes>`, flushed before the acknowledgement goes out.
The acknowledgement is python-hl7's `Message.create_ack`: AA, or AE with ERR 101 for the
MSH-10s listed in --refuse. Binds 127.0.0.1 only; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import ssl

import hl7
from hl7.mllp import start_hl7_server


def control_id(raw: bytes) -> str:
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = first.split(first[3:4]) if len(first) > 3 else []
    return fields[9].decode("latin-1") if len(fields) > 9 else ""


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--refuse", default="")
    args = p.parse_args()
    refuse = {x for x in args.refuse.split(",") if x}
    log = open(args.log, "a", buffering=1)

    async def on_client(reader, writer):
        try:
            while not writer.is_closing():
                raw = await reader.readblock()
                cid = control_id(raw)
                log.write(f"{cid} {base64.b64encode(raw).decode()}\n")
                log.flush()
                msg = hl7.parse(raw.decode("latin-1"))
                if cid in refuse:
                    ack = msg.create_ack("AE", message_id=f"PEER{cid}")
                    text = str(ack) + "\rERR|||101^Required field missing^HL70357|E"
                else:
                    text = str(msg.create_ack("AA", message_id=f"PEER{cid}"))
                writer.writeblock(text.encode("latin-1"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
    server = await start_hl7_server(on_client, "127.0.0.1", args.port, ssl=ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("listening", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
