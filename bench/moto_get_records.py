"""Measures moto's own GetRecords time, the floor under the latency benchmark.

A writer puts 100 items/s into a fresh table while this polls its stream's shard every
200 ms (5 calls a second, DynamoDB's per-shard limit) for 20 s and prints the GetRecords
time at p50/p90/max and the records per page. Needs moto on 127.0.0.1:4566
(./localstack/up.sh) and boto3 (its venv):

    ~/.cache/dynamodb-cdc/venv/bin/python bench/moto_get_records.py
"""

import statistics
import threading
import time
import uuid

import boto3

kw=dict(endpoint_url="http://127.0.0.1:4566", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
ddb=boto3.client("dynamodb",**kw); st=boto3.client("dynamodbstreams",**kw)
t="lat-"+uuid.uuid4().hex[:6]
ddb.create_table(TableName=t,KeySchema=[{"AttributeName":"pk","KeyType":"HASH"}],AttributeDefinitions=[{"AttributeName":"pk","AttributeType":"S"}],BillingMode="PAY_PER_REQUEST",StreamSpecification={"StreamEnabled":True,"StreamViewType":"NEW_AND_OLD_IMAGES"})
arn=ddb.describe_table(TableName=t)["Table"]["LatestStreamArn"]
sh=st.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]["ShardId"]
it=st.get_shard_iterator(StreamArn=arn,ShardId=sh,ShardIteratorType="LATEST")["ShardIterator"]
stop=False
def writer():
    ddb2=boto3.client("dynamodb",**kw); n=0; start=time.time()
    while not stop:
        ddb2.put_item(TableName=t,Item={"pk":{"S":"k%d"%(n%500)},"n":{"N":str(n)},"pad":{"S":"x"*100}}); n+=1
        time.sleep(max(0,start+n/100-time.time()))
th=threading.Thread(target=writer); th.start()
durs=[]; counts=[]
start=time.time(); k=0
while time.time()-start<20:
    k+=1
    t0=time.time(); r=st.get_records(ShardIterator=it); d=time.time()-t0
    it=r["NextShardIterator"]; durs.append(d*1000); counts.append(len(r["Records"]))
    time.sleep(max(0,start+k*0.2-time.time()))
stop=True; th.join()
durs.sort(); print("GetRecords ms p50 %.1f p90 %.1f max %.1f; records/page %.1f; calls %d"%(durs[len(durs)//2],durs[int(len(durs)*.9)],durs[-1],statistics.mean(counts),len(durs)))
