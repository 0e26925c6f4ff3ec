#!/usr/bin/env python3
"""The SQLite floor of the embedded default: how many conversations a second SQLite itself can
carry with the statements convoq's writer runs for each one, in one thread, with no HTTP, no
driver threads and no Rust around it.

Usage:  bench/sqlite_floor.py [--conversations N] [--batch B ...] [--claims | --run-first]
                              [--convoq PATH]

The schema is convoq's own (`convoq migrate` on a fresh file in a temporary directory); the
statements are copies of the SQLite dialect's (crates/convoq-queue/src/sql/sqlite/write.rs,
crates/convoq/src/store/sqlite.rs), with the same settings (WAL, synchronous=NORMAL, a 16 MB
page cache on the writer, foreign keys on, passive checkpoints on a second connection every
5 ms beside SQLite's own). For each conversation, as the writer does it under load:

  1. its `create_conversation` job is added (B jobs per statement, committed on their own),
     inserted already claimed under a local worker's lease (claim on add, what the writer does
     while the process's workers have free slots; `--claims` adds them waiting instead);
  2. in one transaction: (with `--claims`, B database jobs claimed,) B jobs completed (fenced by
     their lease token), their conversations and their audit rows inserted (the audit record
     commits with its conversation: no audit job); the lifetime totals updated;
  3. every 500 jobs, a prune of 500 finished jobs past the keep count (1,000).

With `--run-first` (what the writer does now while a local worker has a free slot: the job's
processor ran before the add, and the add commits its completion), steps 1 and 2 are one
transaction: the jobs inserted claimed, completed, their conversations and audit rows, one
commit.

It prints microseconds per conversation for each step and conversations per second. A figure
the service could reach only with none of its own costs (HTTP, JSON, the runtime, the
workers) on the machine; see BENCHMARKS.md for how it is used.
Bounded: N conversations (default 60,000) per batch size, in a temporary directory.
"""
import argparse
import itertools
import json
import os
import random
try:
    # A recent SQLite where one is installed (`pip install pysqlite3-binary`): closer to the
    # one convoq bundles (rusqlite's, 3.46) than the system's, and its JSON functions
    # cache parsed text as convoq's do.
    import pysqlite3 as sqlite3
except ImportError:
    import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ADD_CLAIMED = (
    "WITH v AS MATERIALIZED (SELECT value ->> 0 AS queue, value ->> 1 AS id, value ->> 2 AS name, "
    "value ->> 3 AS data, value ->> 4 AS opts, value ->> 5 AS priority, value ->> 6 AS run_at, "
    "value ->> 7 AS max_attempts, value ->> 8 AS token, value ->> 9 AS expires, "
    "value ->> 8 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM cq_queues q WHERE q.name = value ->> 0 "
    "AND q.paused = 1) AS held FROM json_each(?2)) "
    "INSERT INTO cq_jobs (queue, id, name, data, opts, priority, run_at, max_attempts, "
    "created_at, state, lease_token, lease_expires_at, attempts_made, processed_at) "
    "SELECT queue, id, name, data, opts, priority, run_at, max_attempts, ?1, "
    "CASE WHEN held THEN 'active' ELSE 'waiting' END, CASE WHEN held THEN token END, "
    "CASE WHEN held THEN expires END, CASE WHEN held THEN 1 ELSE 0 END, CASE WHEN held THEN ?1 END "
    "FROM v WHERE true "
    "ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id, state"
)
ADD = (
    "INSERT INTO cq_jobs (queue, id, name, data, opts, priority, run_at, max_attempts, "
    "created_at, state) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, "
    "value ->> 5, value ->> 6, value ->> 7, ?, 'waiting' FROM json_each(?) WHERE true "
    "ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id"
)
CLAIM = (
    "UPDATE cq_jobs SET state = 'active', lease_token = ?1, lease_expires_at = ?2, "
    "attempts_made = attempts_made + 1, processed_at = ?3 WHERE seq IN (SELECT seq FROM cq_jobs "
    "WHERE queue = ?4 AND state = 'waiting' AND run_at <= ?3 ORDER BY priority, run_at, seq "
    "LIMIT ?5) AND NOT EXISTS (SELECT 1 FROM cq_queues WHERE name = ?4 AND paused = 1) "
    "RETURNING queue, id, name, data, opts, state, run_at, attempts_made, stalled_count, result, "
    "failed_reason, created_at, processed_at, finished_at"
)
COMPLETE = (
    "UPDATE cq_jobs SET state = 'completed', result = v.result, finished_at = ?, "
    "lease_token = NULL, lease_expires_at = NULL, keep_count = v.keep_count, "
    "expire_at = v.expire_at FROM (SELECT value ->> 0 AS queue, value ->> 1 AS id, "
    "value ->> 2 AS token, value ->> 3 AS result, value ->> 4 AS keep_count, "
    "value ->> 5 AS expire_at FROM json_each(?)) AS v WHERE cq_jobs.queue = v.queue "
    "AND cq_jobs.id = v.id AND cq_jobs.state = 'active' AND cq_jobs.lease_token = v.token"
)
CONVERSATIONS = (
    "INSERT INTO conversations (id, user_id, title, personality_mode, created_at, updated_at) "
    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 4 "
    "FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING"
)
AUDIT = (
    "INSERT INTO audit_log (id, event, subject_id, actor, request_id, created_at) "
    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 "
    "FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING"
)
TOTALS = (
    "INSERT INTO cq_queues (name, completed_total) VALUES (?, ?) ON CONFLICT (name) "
    "DO UPDATE SET completed_total = completed_total + excluded.completed_total"
)
PRUNE = (
    "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM (SELECT seq, keep_count, ROW_NUMBER() "
    "OVER (ORDER BY finished_at DESC, seq DESC) AS rn FROM (SELECT seq, keep_count, finished_at "
    "FROM cq_jobs WHERE queue = ?1 AND state = ?2 AND state IN ('completed', 'failed') "
    "AND keep_count IS NOT NULL ORDER BY finished_at DESC, seq DESC LIMIT ?3)) "
    "WHERE rn > keep_count LIMIT ?4) RETURNING id"
)
OPTS = json.dumps({
    "attempts": 3,
    "backoff": {"type": "exponential", "delay": 1000, "jitter": 0.5},
    "removeOnComplete": {"count": 1000, "age": 604800},
    "removeOnFail": {"count": 1000, "age": 604800},
})
WEEK_MS = 604_800_000


def time_ordered_ids():
    """Ids that sort by creation, like the UUIDv7 ids convoq gives jobs and conversations."""
    counter = itertools.count()
    return lambda: "%016x-%s" % (next(counter), uuid.uuid4().hex[:16])


def checkpoints(path, stop):
    """Passive checkpoints on a connection of their own, as convoq runs them beside the writer."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    while not stop.is_set():
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        time.sleep(0.005)
    conn.close()


def run(binary, conversations, batch, workdir, claims, run_first=False):
    path = os.path.join(workdir, "floor-%d.db" % batch)
    migrate = subprocess.run([binary, "migrate", "--database-url", "sqlite://" + path],
                             capture_output=True, text=True)
    if migrate.returncode != 0:
        raise SystemExit("convoq migrate failed:\n" + migrate.stdout + migrate.stderr)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "cache_size = -16000",
                   "foreign_keys = ON", "temp_store = MEMORY"):
        db.execute("PRAGMA " + pragma).fetchall()
    db.executemany(
        "INSERT INTO users (id, discord_id, username, created_at, updated_at) "
        "VALUES (?, ?, ?, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
        [("user-%d" % n, str(100000 + n), "user%d" % n) for n in range(1000)])
    stop = threading.Event()
    checkpointer = threading.Thread(target=checkpoints, args=(path, stop))
    checkpointer.start()
    new_id = time_ordered_ids()
    spent = {}

    def step(name, sql, params=()):
        # Only SQLite's work is timed: the parameters are built before.
        t0 = time.perf_counter()
        out = db.execute(sql, params).fetchall()
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return out

    now = int(time.time() * 1000)
    done, since_prune = 0, 0
    while done < conversations:
        now += 1
        adds = []
        for _ in range(batch):
            data = {"conversationId": new_id(), "userId": "user-%d" % random.randrange(1000),
                    "title": "hello there", "personalityMode": "helpful",
                    "requestId": new_id(), "actor": "local"}
            adds.append(["database", new_id(), "create_conversation", json.dumps(data), OPTS, 0,
                         now, 3] + ([] if claims else ["lease", now + 30000]))
        step("add", "BEGIN IMMEDIATE")
        added = step("add", ADD if claims else ADD_CLAIMED, (now, json.dumps(adds)))
        if not run_first:
            step("commit", "COMMIT")
            step("complete", "BEGIN IMMEDIATE")
        if claims:
            jobs = step("claim", CLAIM, ("lease", now + 30000, now, "database", batch))
        else:
            assert all(a[2] == "active" for a in added), "claimed on add"
            jobs = [(a[0], a[1], a[2], a[3]) for a in adds]
        datas = [json.loads(j[3]) for j in jobs]
        completions = json.dumps([
            [j[0], j[1], "lease", json.dumps({"success": True,
                                              "conversationId": d["conversationId"],
                                              "createdAt": "2026-11-29T00:00:00.000Z"}),
             1000, now + WEEK_MS] for j, d in zip(jobs, datas)])
        step("complete", COMPLETE, (now, completions))
        rows = json.dumps([[d["conversationId"], d["userId"], d["title"], d["personalityMode"],
                            "2026-11-29T00:00:00.000Z"] for d in datas])
        step("insert rows", CONVERSATIONS, (rows,))
        rows = json.dumps([["conversation.created-" + d["conversationId"],
                            "conversation.created", d["conversationId"], d["actor"],
                            d["requestId"], "2026-11-29T00:00:00.000Z"] for d in datas])
        step("insert rows", AUDIT, (rows,))
        step("commit", TOTALS, ("database", len(jobs)))
        step("commit", "COMMIT")
        done += batch
        since_prune += batch
        if since_prune >= 500:
            since_prune -= 500
            step("prune", "BEGIN IMMEDIATE")
            step("prune", PRUNE, ("database", "completed", 1000 + 500, 500))
            step("prune", "COMMIT")
    stop.set()
    checkpointer.join()
    rows = db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
    db.close()
    assert rows == done, (rows, done)
    return done, spent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--conversations", type=int, default=60000)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128],
                        help="jobs per statement (the writer's batch); default 32 128")
    parser.add_argument("--claims", action="store_true",
                        help="add jobs waiting and claim them apart (no claim on add)")
    parser.add_argument("--run-first", action="store_true",
                        help="add, complete and insert each batch in one transaction (the "
                             "writer's run-first path)")
    parser.add_argument("--convoq", default=os.path.join(ROOT, "target", "release", "convoq"),
                        help="the convoq binary whose `migrate` makes the schema")
    args = parser.parse_args()
    if args.conversations < 1:
        parser.error("--conversations must be at least 1")
    if any(b < 1 for b in args.batch):
        parser.error("--batch sizes must be at least 1")
    if args.claims and args.run_first:
        parser.error("--claims and --run-first exclude each other: a job run first is never "
                     "claimed apart")
    if not os.access(args.convoq, os.X_OK):
        parser.error("no convoq binary at %s: run `cargo build --release -p convoq` first"
                     % args.convoq)
    print("SQLite %s (Python's sqlite3), %d conversations per batch size" %
          (sqlite3.sqlite_version, args.conversations))
    with tempfile.TemporaryDirectory(prefix="convoq-floor.") as workdir:
        for batch in args.batch:
            done, spent = run(args.convoq, args.conversations, batch, workdir, args.claims,
                              args.run_first)
            total = sum(spent.values())
            parts = ", ".join("%s %.1f" % (k, v * 1e6 / done) for k, v in spent.items())
            print("batch %4d: %6.1f us per conversation (%s) -> %s conversations/s" %
                  (batch, total * 1e6 / done, parts, format(int(done / total), ",")))


if __name__ == "__main__":
    main()
