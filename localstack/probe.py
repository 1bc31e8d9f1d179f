#!/usr/bin/env python3
"""Stdlib-only health probes used by localstack/up.sh.

    probe.py aws   HOST PORT   # moto's /moto-api/config, else DynamoDB ListTables, answers
    probe.py kafka HOST PORT   # Kafka ApiVersions v0 + Metadata v0 answer

Exit status 0 when healthy, 1 otherwise (the reason goes to stderr).
The Kafka probe prints the brokers advertised in the Metadata response.
"""

import json
import socket
import struct
import sys
import urllib.error
import urllib.request

TIMEOUT = 3.0


def probe_aws(host: str, port: int) -> None:
    # moto: GET /moto-api/config. Unlike an AWS call it does not use up one of
    # moto's INITIAL_NO_AUTH_ACTION_COUNT unauthenticated calls, and it works
    # while IAM enforcement is on.
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/moto-api/config", timeout=TIMEOUT) as resp:
            if resp.status in (200, 201) and isinstance(json.loads(resp.read()), dict):
                return
    except urllib.error.HTTPError:
        pass  # not moto (e.g. LocalStack): fall through to a DynamoDB call
    except ValueError:
        pass
    # Any other emulator (LocalStack): DynamoDB ListTables. Emulators route on
    # the credential scope of the Authorization header and do not check the
    # signature unless IAM enforcement is on.
    req = urllib.request.Request(
        f"http://{host}:{port}/",
        data=b"{}",
        method="POST",
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "DynamoDB_20120810.ListTables",
            "Authorization": (
                "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/dynamodb/aws4_request, "
                "SignedHeaders=host;x-amz-target, Signature=00"
            ),
        },
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        body = json.loads(resp.read() or b"{}")
    if "TableNames" not in body:
        raise RuntimeError(f"unexpected ListTables answer: {body!r}")


def _kafka_call(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client_id = b"dynamodb-cdc-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    payload = _recv_exact(sock, size)
    got_corr = struct.unpack(">i", payload[:4])[0]
    if got_corr != corr:
        raise RuntimeError(f"correlation id mismatch: sent {corr}, got {got_corr}")
    return payload[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("connection closed by broker")
        buf += chunk
    return buf


def probe_kafka(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        # ApiVersions v0 (api key 18): empty body.
        resp = _kafka_call(sock, 18, 0, 1, b"")
        (err,) = struct.unpack(">h", resp[:2])
        if err != 0:
            raise RuntimeError(f"ApiVersions error_code={err}")
        # Metadata v0 (api key 3): empty topic array = all topics.
        resp = _kafka_call(sock, 3, 0, 2, struct.pack(">i", 0))
        off = 0
        (n_brokers,) = struct.unpack_from(">i", resp, off)
        off += 4
        brokers = []
        for _ in range(n_brokers):
            node_id, hlen = struct.unpack_from(">ih", resp, off)
            off += 6
            bhost = resp[off : off + hlen].decode()
            off += hlen
            (bport,) = struct.unpack_from(">i", resp, off)
            off += 4
            brokers.append(f"{node_id}@{bhost}:{bport}")
        if not brokers:
            raise RuntimeError("Metadata returned no brokers")
        print("brokers: " + ", ".join(brokers))


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("aws", "kafka"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        (probe_aws if kind == "aws" else probe_kafka)(host, port)
    except (OSError, RuntimeError, ValueError, struct.error, urllib.error.URLError) as exc:
        print(f"{kind} probe {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
