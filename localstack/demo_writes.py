#!/usr/bin/env python3
"""Write a stream of demo changes (INSERT / MODIFY / REMOVE) to the demo tables
created by seed.py, so dynamodb-cdc has something to capture.

    demo_writes.py [--count N] [--rate PER_SECOND] [--table demo_orders|demo_events|both]
                   [--seed N]

Run with the moto venv's python (~/.cache/dynamodb-cdc/venv/bin/python), or
any python3 with boto3. Endpoint from AWS_ENDPOINT_URL (default
http://127.0.0.1:4566); dummy credentials unless set in the environment.
"""

import argparse
import os
import random
import sys
import time
import uuid
from decimal import Decimal

import boto3

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

STATUSES = ["NEW", "PAID", "PACKED", "SHIPPED", "DELIVERED"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100, help="number of changes to write (default 100)")
    p.add_argument("--rate", type=float, default=0.0, help="changes per second (default: as fast as possible)")
    p.add_argument("--table", choices=["demo_orders", "demo_events", "both"], default="both")
    p.add_argument("--seed", type=int, default=None, help="random seed for a reproducible sequence")
    p.add_argument("--quiet", action="store_true", help="only print the summary")
    return p.parse_args()


class Orders:
    name = "demo_orders"

    def __init__(self, table, rng: random.Random):
        self.t, self.rng, self.live = table, rng, []

    def insert(self) -> str:
        oid = f"o-{uuid.UUID(int=self.rng.getrandbits(128)).hex[:12]}"
        self.t.put_item(
            Item={
                "order_id": oid,
                "customer": f"c-{self.rng.randint(1, 50):03d}",
                "status": "NEW",
                "amount": Decimal(self.rng.randint(100, 100000)) / 100,
                "items": [f"sku-{self.rng.randint(1, 999)}" for _ in range(self.rng.randint(1, 3))],
                "gift": self.rng.random() < 0.1,
                "created_at": int(time.time() * 1000),
            }
        )
        self.live.append(oid)
        return oid

    def modify(self) -> str:
        oid = self.rng.choice(self.live)
        self.t.update_item(
            Key={"order_id": oid},
            UpdateExpression="SET #s = :s, updated_at = :u ADD revision :one",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":s": self.rng.choice(STATUSES[1:]), ":u": int(time.time() * 1000), ":one": 1},
        )
        return oid

    def remove(self) -> str:
        oid = self.live.pop(self.rng.randrange(len(self.live)))
        self.t.delete_item(Key={"order_id": oid})
        return oid


class Events:
    name = "demo_events"

    def __init__(self, table, rng: random.Random):
        self.t, self.rng, self.live = table, rng, []

    def insert(self) -> str:
        dev = f"dev-{self.rng.randint(1, 20):02d}"
        ts = int(time.time() * 1000) * 1000 + self.rng.randint(0, 999)
        self.t.put_item(
            Item={
                "device_id": dev,
                "ts": ts,
                "kind": self.rng.choice(["temp", "humidity", "door"]),
                "value": Decimal(str(round(self.rng.uniform(-10, 40), 2))),
                "tags": {"site": self.rng.choice(["ams", "fra", "lis"]), "fw": "1.2.3"},
                "payload": bytes(self.rng.getrandbits(8) for _ in range(8)),
            }
        )
        self.live.append((dev, ts))
        return f"{dev}/{ts}"

    def modify(self) -> str:
        dev, ts = self.rng.choice(self.live)
        self.t.update_item(
            Key={"device_id": dev, "ts": ts},
            UpdateExpression="SET acked = :t, #v = #v + :d",
            ExpressionAttributeNames={"#v": "value"},
            ExpressionAttributeValues={":t": True, ":d": Decimal("0.5")},
        )
        return f"{dev}/{ts}"

    def remove(self) -> str:
        dev, ts = self.live.pop(self.rng.randrange(len(self.live)))
        self.t.delete_item(Key={"device_id": dev, "ts": ts})
        return f"{dev}/{ts}"


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    ddb = boto3.resource(
        "dynamodb",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
    )
    tables = []
    if args.table in ("demo_orders", "both"):
        tables.append(Orders(ddb.Table("demo_orders"), rng))
    if args.table in ("demo_events", "both"):
        tables.append(Events(ddb.Table("demo_events"), rng))

    counts = {t.name: {"INSERT": 0, "MODIFY": 0, "REMOVE": 0} for t in tables}
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    for i in range(args.count):
        t = rng.choice(tables)
        r = rng.random()
        if not t.live or r < 0.5:
            op, key = "INSERT", t.insert()
        elif r < 0.85:
            op, key = "MODIFY", t.modify()
        else:
            op, key = "REMOVE", t.remove()
        counts[t.name][op] += 1
        if not args.quiet:
            print(f"{i + 1:>6} {t.name:<12} {op:<6} {key}", flush=True)
        if interval:
            delay = start + (i + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    elapsed = time.monotonic() - start
    for name, c in counts.items():
        print(f"{name}: {c['INSERT']} inserts, {c['MODIFY']} modifies, {c['REMOVE']} removes")
    print(f"{args.count} changes in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
