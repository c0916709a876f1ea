"""A do-nothing pynetdicom Storage SCP: the ceiling any pynetdicom receiver can reach here.

    python -m bench.null_scp --port PORT [--aet NULL_SCP] [--fast-polling true|false]

It accepts the same presentation contexts as the node (``deploy.node.scp.STORAGE_SOP_CLASSES`` x
every transfer syntax, plus Verification), advertises the same unlimited maximum PDU and installs
the same polling tuning (``deploy.node.pynetdicom_tuning``), then answers every C-STORE with
0x0000 without decoding, hashing or writing anything. Whatever the node does per instance
(decode, durable write, queue commit) comes on top of this, so ``bench/ingest.py`` reports the
null handler's rate next to storescp's: if it is below half of storescp, no pynetdicom receiver
reaches half of storescp on this machine. Written by hand for the benchmark (a dozen lines of
pynetdicom set-up); not used by the node.
"""

from __future__ import annotations

import argparse
import signal
import threading

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from deploy.node.pynetdicom_tuning import conn_open_handlers
from deploy.node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES


def serve(port: int, aet: str = "NULL_SCP", fast_polling: bool = True) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM / SIGINT."""
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_C_ECHO, lambda event: 0x0000),
                *conn_open_handlers(fast_polling)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--aet", default="NULL_SCP")
    ap.add_argument("--fast-polling", choices=["true", "false"], default="true")
    args = ap.parse_args(argv)
    serve(args.port, args.aet, args.fast_polling == "true")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
