"""sdbatch: the batch service around sdcore (config, jobs, Celery tasks, storage, progress, CLI).

Thin glue: every image is made by `sdcore`; this package only decides which images, where they go and who
makes them. See docs/interfaces.md for the contracts.
"""
