"""Sources, one module per transport: each holds its source class and its command's ``run``.

A source notices which pair may have changed and acts on each job's ``Disposition``; the
runner (``watcher.runner``) decides when and how many run.
"""
