"""sdbatch: the batch service around sdcore (config, jobs, task messages, Celery app and task, storage,
progress, CLI).

Thin glue: every image is made by `sdcore`, and every generation setting is sdcore.params'; this package only
decides which images, where they go and who makes them. The enqueue side (worker.client) never imports the
task module (worker.tasks) nor torch: what both sides share is in worker.messages. See docs/interfaces.md
for the contracts.
"""
