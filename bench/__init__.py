"""Benchmarks of the worker on the local cloud: `make bench` (`python -m bench`).

`python -m bench` compares `worker run` with the ceiling (an ack-only subscriber,
bench/ceiling.py) and a naive worker (bench/naive_worker.py) on throughput, latency,
CPU, memory and calls to Google; bench/batch_memory.py measures a batch fan-out's RSS.
"""
