"""The service layer: what the API's routes and the dashboard's pages both do, written once.

- ``jobs``: create (with idempotency, the per-user cap and the queue), retry, cancel, delete,
  download, live progress, and who may change a job
- ``uploads``: the one upload path (multipart parsed while it streams, under one cap)
- ``specs``: a job spec checked against the server's caps, allowed directories and uploads

Routers and pages parse the request, call a service, and render; a service raises
``HTTPException`` with the status and a reason a person can act on.
"""
