"""pairwatch core: compare one image pair with bounded memory and a hard timeout.

Importable on its own (also as an AWS Lambda handler via ``handler.app.lambda_handler``);
it knows nothing of the event sources in ``watcher``.
"""

__version__ = "0.1.0"
