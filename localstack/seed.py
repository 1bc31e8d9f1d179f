#!/usr/bin/env python3
"""Create the demo resources for dynamodb-cdc on the local AWS emulator.

Idempotent: existing tables and roles are kept (the role's policies are
re-put, which is harmless). Run through localstack/seed.sh, which uses the
moto venv's python (boto3 comes with moto).

Environment: AWS_ENDPOINT_URL (default http://127.0.0.1:4566), AWS_REGION
(default us-east-1); credentials default to the dummy pair test/test.
"""

import json
import os
import sys
import time

import boto3
from botocore.exceptions import ClientError

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
ROLE_NAME = "dynamodb-cdc-demo"
EXTERNAL_ID = "demo-external-id"

TABLES = [
    {
        "TableName": "demo_orders",
        "KeySchema": [{"AttributeName": "order_id", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "order_id", "AttributeType": "S"}],
    },
    {
        "TableName": "demo_events",
        "KeySchema": [
            {"AttributeName": "device_id", "KeyType": "HASH"},
            {"AttributeName": "ts", "KeyType": "RANGE"},
        ],
        "AttributeDefinitions": [
            {"AttributeName": "device_id", "AttributeType": "S"},
            {"AttributeName": "ts", "AttributeType": "N"},
        ],
    },
]

READ_ACTIONS = [
    "dynamodb:DescribeTable",
    "dynamodb:DescribeStream",
    "dynamodb:GetShardIterator",
    "dynamodb:GetRecords",
    "dynamodb:ListStreams",
]


def client(service: str):
    return boto3.client(
        service,
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
    )


def ensure_table(ddb, spec: dict) -> str:
    name = spec["TableName"]
    try:
        table = ddb.describe_table(TableName=name)["Table"]
        print(f"table {name}: exists")
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        ddb.create_table(
            **spec,
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        print(f"table {name}: created")
        for _ in range(60):
            table = ddb.describe_table(TableName=name)["Table"]
            if table["TableStatus"] == "ACTIVE":
                break
            time.sleep(1)
    spec_now = table.get("StreamSpecification") or {}
    if not spec_now.get("StreamEnabled"):
        # Only on emulators that allow it; moto cannot re-enable a disabled stream.
        ddb.update_table(
            TableName=name,
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        table = ddb.describe_table(TableName=name)["Table"]
        print(f"table {name}: stream enabled")
    elif spec_now.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
        print(
            f"table {name}: WARNING stream view type is {spec_now.get('StreamViewType')}, "
            "not NEW_AND_OLD_IMAGES",
            file=sys.stderr,
        )
    arn = table["LatestStreamArn"]
    print(f"  stream: {arn}")
    return arn


def ensure_role(iam, account_id: str) -> str:
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}},
            }
        ],
    }
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": READ_ACTIONS, "Resource": "*"}],
    }
    try:
        role = iam.get_role(RoleName=ROLE_NAME)["Role"]
        iam.update_assume_role_policy(RoleName=ROLE_NAME, PolicyDocument=json.dumps(trust))
        print(f"role {ROLE_NAME}: exists")
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchEntity":
            raise
        role = iam.create_role(
            RoleName=ROLE_NAME,
            AssumeRolePolicyDocument=json.dumps(trust),
            Description="dynamodb-cdc demo: read DynamoDB Streams",
        )["Role"]
        print(f"role {ROLE_NAME}: created")
    iam.put_role_policy(
        RoleName=ROLE_NAME,
        PolicyName="dynamodb-cdc-read-streams",
        PolicyDocument=json.dumps(policy),
    )
    return role["Arn"]


def main() -> int:
    print(f"endpoint {ENDPOINT} region {REGION}")
    ddb = client("dynamodb")
    for spec in TABLES:
        ensure_table(ddb, spec)
    account_id = client("sts").get_caller_identity()["Account"]
    role_arn = ensure_role(client("iam"), account_id)
    print()
    print(f"ROLE_ARN={role_arn}")
    print(f"EXTERNAL_ID={EXTERNAL_ID}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
