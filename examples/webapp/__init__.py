"""The reference web app: score an account, start a batch, watch the results arrive.

Results reach it the way they reach a web app on Cloud Run: pushed by Pub/Sub to
POST /pubsub/results with an OIDC token it verifies (worker.client.push), kept in
SQLite keyed by job_id. Run it beside `worker dev` with `make webapp`.
"""
