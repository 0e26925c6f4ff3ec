// The Node BullMQ side of convoq's interop tests: what the Node stack being replaced did, so
// that a test can check convoq and Node BullMQ share queues both ways.
//
//   node bullmq.mjs produce COUNT USER_ID   add COUNT create_conversation jobs as the Express
//                                           route did, wait for each through QueueEvents and
//                                           print one JSON line per job
//   node bullmq.mjs work COUNT              run a Node Worker on `database` until it has
//                                           completed COUNT jobs; print one JSON line per job
//   node bullmq.mjs inspect JOB_ID          print the job as Node reads it (one JSON line)
//
// Settings: REDIS_URL (redis://host:port[/db]), PREFIX (the key prefix, default "bull"),
// TIMEOUT_MS (how long to wait for jobs, default 20000). Exits non-zero on any failure.

import { Queue, QueueEvents, Worker } from 'bullmq';
import IORedis from 'ioredis';

const QUEUE = 'database';
const url = new URL(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
const options = {
  host: url.hostname,
  port: Number(url.port || 6379),
  username: url.username || undefined,
  password: url.password ? decodeURIComponent(url.password) : undefined,
  db: Number(url.pathname.slice(1) || 0),
  maxRetriesPerRequest: null,
};
// BullMQ 6 takes its ioredis client ready-made in an ES module: one per Queue, QueueEvents and
// Worker (the last two block on theirs).
const connection = () => new IORedis(options);
const prefix = process.env.PREFIX ?? 'bull';
const timeoutMs = Number(process.env.TIMEOUT_MS ?? 20000);
const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

async function produce(count, userId) {
  const queue = new Queue(QUEUE, { connection: connection(), prefix });
  const events = new QueueEvents(QUEUE, { connection: connection(), prefix });
  await events.waitUntilReady();
  const seen = new Map();
  events.on('completed', ({ jobId, returnvalue }) => seen.set(jobId, returnvalue));
  try {
    const jobs = [];
    for (let i = 0; i < count; i++) {
      // Exactly the old route: POST /api/chat/conversations → queue.add(...)
      jobs.push(
        await queue.add('create_conversation', {
          userId,
          title: `Interop ${i}`,
          personalityMode: 'helpful',
          requestId: `node-producer-${i}`,
        }),
      );
    }
    for (const job of jobs) {
      try {
        const returnvalue = await job.waitUntilFinished(events, timeoutMs);
        // waitUntilFinished answers from the job itself when the job had finished before it was
        // called, possibly before QueueEvents has read the `completed` event off its stream:
        // give the event the same time to arrive.
        const deadline = Date.now() + timeoutMs;
        while (!seen.has(job.id) && Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        print({ id: job.id, outcome: 'completed', returnvalue, fromEvent: seen.get(job.id) ?? null });
      } catch (err) {
        print({ id: job.id, outcome: 'failed', failedReason: String(err?.message ?? err) });
      }
    }
  } finally {
    await events.close();
    await queue.close();
  }
}

async function work(count) {
  const done = [];
  let finish;
  const allDone = new Promise((resolve) => {
    finish = resolve;
  });
  const worker = new Worker(
    QUEUE,
    async (job) => {
      if (job.name !== 'create_conversation') {
        throw new Error(`unexpected job name ${job.name}`);
      }
      return { success: true, conversationId: job.data.conversationId ?? null, processedBy: 'node' };
    },
    { connection: connection(), prefix, concurrency: 1 },
  );
  worker.on('completed', (job) => {
    done.push({ id: job.id, name: job.name, data: job.data, attemptsMade: job.attemptsMade });
    if (done.length >= count) finish();
  });
  const timer = setTimeout(finish, timeoutMs);
  await allDone;
  clearTimeout(timer);
  await worker.close();
  for (const d of done) print(d);
  if (done.length < count) {
    throw new Error(`completed ${done.length} of ${count} jobs within ${timeoutMs} ms`);
  }
}

async function inspect(id) {
  const queue = new Queue(QUEUE, { connection: connection(), prefix });
  try {
    const job = await queue.getJob(id);
    if (!job) {
      print({ id, exists: false });
      return;
    }
    print({
      id: job.id,
      exists: true,
      name: job.name,
      state: await job.getState(),
      data: job.data,
      attemptsMade: job.attemptsMade,
      failedReason: job.failedReason ?? null,
      returnvalue: job.returnvalue ?? null,
      finishedOn: job.finishedOn ?? null,
    });
  } finally {
    await queue.close();
  }
}

const [command, ...args] = process.argv.slice(2);
const commands = {
  produce: () => produce(Number(args[0]), args[1]),
  work: () => work(Number(args[0])),
  inspect: () => inspect(args[0]),
};
if (!commands[command]) {
  process.stderr.write('usage: node bullmq.mjs produce COUNT USER_ID | work COUNT | inspect JOB_ID\n');
  process.exit(2);
}
commands[command]().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
