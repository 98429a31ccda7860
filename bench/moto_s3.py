"""moto's S3 server on 127.0.0.1 with one bucket, for the benchmarks that read or write S3."""

from __future__ import annotations

import os


def start_moto_bucket(bucket: str = "bench"):
    """Start the server, point the AWS variables at it (this process and its children), create bucket.
    Returns (server, endpoint URL); call server.stop() when done."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return server, endpoint
