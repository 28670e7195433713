"""pairwatch event sources (local folder, S3/SQS, MinIO, polling) and the ``pairwatch`` CLI.

The watchers decide *when* a pair is ready and *where* its result goes; *how* a pair is compared
is entirely ``handler``'s business.
"""
