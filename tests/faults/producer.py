"""The fault suite's producer process: enqueues ``soak.record`` jobs at a
steady rate until SIGTERM, recording each invocation in a history file.

Run as ``python -m faults.producer ...`` with tests/ on the path (see
``harness.Producers``). Threads share the rate; each has its own
``corral.Client``; even threads call ``enqueue``, odd ones ``enqueue_many``
with 1 to ``--max-batch`` jobs. Every job is an invocation (token
``p<thread>-<n>``): ``invoke`` is written before the call, ``ok`` (with the
job id), ``fail`` (refused) or ``unknown`` (no answer) after it. Exits 0 on
SIGTERM once every thread has recorded its last outcome, 1 on an error
nobody expected (after recording it as ``unknown``).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
import traceback

import corral

from .history import HistoryFile

TASK = "soak.record"


class Producer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.history = HistoryFile(args.history)
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run_thread(self, index: int) -> None:
        args = self.args
        rng = random.Random(f"{args.seed}-{index}")
        interval = args.threads / args.rate
        client = corral.Client(args.endpoint, timeout=args.timeout)
        seq = 0
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                size = 1 if index % 2 == 0 else rng.randint(1, args.max_batch)
                tokens = [f"p{index}-{seq + i}" for i in range(size)]
                seq += size
                jobs = [
                    corral.Job(
                        TASK,
                        {"path": args.record, "token": t, "seconds": rng.uniform(*args.seconds)},
                    )
                    for t in tokens
                ]
                self.enqueue(client, index, tokens, jobs)
                next_at = max(next_at + size * interval, time.monotonic() - 1.0)
                self.stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()

    def enqueue(
        self, client: corral.Client, index: int, tokens: list[str], jobs: list[corral.Job]
    ) -> None:
        for token in tokens:
            self.history.invoke(token)
        try:
            if index % 2 == 0:
                ids = [client.enqueue(jobs[0].task, jobs[0].payload)]
            else:
                ids = client.enqueue_many(jobs)
        except corral.BrokerUnavailable as exc:
            for token in tokens:
                self.history.unknown(token, str(exc))
        except (corral.DiskFull, corral.BrokerError) as exc:  # refused by the broker
            for token in tokens:
                self.history.fail(token, repr(exc))
        except BaseException as exc:
            for token in tokens:
                self.history.unknown(token, repr(exc))
            self.errors.append(traceback.format_exc())
            self.stop.set()
        else:
            if len(ids) != len(tokens):
                self.errors.append(f"{len(tokens)} jobs enqueued, {len(ids)} ids back: {ids}")
                self.stop.set()
            for token, job_id in zip(tokens, ids, strict=False):
                self.history.ok(token, job_id)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="faults.producer")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--history", required=True, help="file of invocation lines")
    parser.add_argument("--record", required=True, help="file the handlers write to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs per second in all")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, nargs=2, default=(0.0, 0.05))
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout, seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    producer = Producer(parse(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, lambda *_: producer.stop.set())
    threads = [
        threading.Thread(target=producer.run_thread, args=(i,), name=f"producer-{i}")
        for i in range(producer.args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in producer.errors:
        print(error, file=sys.stderr)
    return 1 if producer.errors else 0


if __name__ == "__main__":
    sys.exit(main())
