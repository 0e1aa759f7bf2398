"""Shared fixtures: a real moto S3 server on loopback (see tests/fixtures_s3.py)."""

from fixtures_s3 import moto_s3, s3_bucket

__all__ = ["moto_s3", "s3_bucket"]
