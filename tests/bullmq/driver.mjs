// A real BullMQ for the integration tests, driven by JSON lines.
//
// Each line on stdin is one command, {"id": <any>, "cmd": "<name>", ...}; each gets exactly
// one JSON line on stdout carrying the same "id": the result's fields, or {"error": "..."}.
// Commands run concurrently, so a command stuck on a Redis that went away never holds up
// the next; the caller matches answers by "id". A bad line is answered, never fatal.
// Nothing but answers goes to stdout: BullMQ's and our own logs go to stderr.
//
// Usage: node driver.mjs [--redis-url redis://127.0.0.1:6379/0] [--prefix bull]
// (or BULLMQ_REDIS_URL, BULLMQ_PREFIX).

import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { Queue, QueueEvents, Worker } from 'bullmq';
import { Redis } from 'ioredis';

console.log = console.error; // stdout belongs to the answers

const { values: argv } = parseArgs({
  options: { 'redis-url': { type: 'string' }, prefix: { type: 'string' } },
});
const redisUrl = argv['redis-url'] ?? process.env.BULLMQ_REDIS_URL ?? 'redis://127.0.0.1:6379/0';
const prefix = argv.prefix ?? process.env.BULLMQ_PREFIX ?? 'bull';

function connectionOptions(url) {
  const parsed = new URL(url);
  if (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') {
    throw new Error(`not a redis:// URL: ${url}`);
  }
  const options = {
    host: parsed.hostname || '127.0.0.1',
    port: parsed.port ? Number(parsed.port) : 6379,
    db: parsed.pathname.length > 1 ? Number(parsed.pathname.slice(1)) : 0,
  };
  if (parsed.username) options.username = decodeURIComponent(parsed.username);
  if (parsed.password) options.password = decodeURIComponent(parsed.password);
  if (parsed.protocol === 'rediss:') options.tls = {};
  return options;
}

const connection = connectionOptions(redisUrl);
// The driver's own reads (the stream's last id, CLIENT LIST), named so that nobody takes
// it for one of BullMQ's connections.
const redis = new Redis({ ...connection, connectionName: 'jobstats-test-driver' });
redis.on('error', (error) => console.error(`driver: redis: ${error.message}`));

// Events that QueueEvents emits for every stream entry, keyed by the entry's event name.
const STREAM_ID = /^\d+-\d+$/;

class CountingQueueEvents extends QueueEvents {
  constructor(name, options, counts) {
    super(name, options);
    this.counts = counts;
    this.lastEvent = new Map(); // jobId -> its latest event: tells a retry's `delayed`
  }

  emit(event, ...args) {
    const last = args[args.length - 1];
    // Every stream entry is emitted once as (event, fields, id) and once more as
    // `${event}:${jobId}`; count the first only.
    if (typeof last === 'string' && STREAM_ID.test(last) && !event.includes(':')) {
      this.counts[event] = (this.counts[event] ?? 0) + 1;
      const jobId = args[0]?.jobId;
      if (jobId !== undefined) {
        // Back from active: `waiting` says prev=active, but `delayed` (a retry with
        // backoff, moveToDelayed-11.lua) carries no prev at all.
        const fromActive =
          (event === 'waiting' && args[0].prev === 'active') ||
          (event === 'delayed' && this.lastEvent.get(jobId) === 'active');
        if (fromActive) this.counts.retried += 1;
        this.lastEvent.set(jobId, event);
      }
    }
    return super.emit(event, ...args);
  }
}

/** Per queue: the Queue, its QueueEvents, and what the driver saw happen. */
class QueueState {
  constructor(name, queue) {
    this.name = name;
    this.queue = queue;
    this.events = null;
    // From the driver's own QueueEvents, by stream event name (`completed`, `failed`, ...),
    // plus `retried`: jobs moved from active back to waiting or delayed.
    this.eventCounts = { completed: 0, failed: 0, retried: 0 };
    // From the listeners of the driver's own workers: jobs that completed, jobs that failed
    // for good, and failed attempts that BullMQ will retry.
    this.finished = { completed: 0, failed: 0, retried: 0 };
    this.waiters = new Set();
  }

  get finishedCount() {
    return this.finished.completed + this.finished.failed;
  }

  notify() {
    for (const waiter of this.waiters) waiter();
  }
}

const queues = new Map(); // queue name -> Promise<QueueState>
const workers = new Map(); // worker handle -> {worker, queue}
let workerSerial = 0;

function logError(what) {
  return (error) => console.error(`driver: ${what}: ${error?.message ?? error}`);
}

function openQueue(name, { eventsMaxLen } = {}) {
  if (typeof name !== 'string' || name === '') {
    return Promise.reject(new Error('"queue" must be a non-empty string'));
  }
  const known = queues.get(name);
  if (known) {
    if (eventsMaxLen !== undefined) {
      return Promise.reject(new Error(`queue ${name} is already open`));
    }
    return known;
  }
  // Concurrent commands on a new queue share one opening.
  const opening = createQueue(name, eventsMaxLen);
  queues.set(name, opening);
  opening.catch(() => queues.delete(name));
  return opening;
}

async function createQueue(name, eventsMaxLen) {
  const options = { connection, prefix };
  if (eventsMaxLen !== undefined) options.streams = { events: { maxLen: eventsMaxLen } };
  const queue = new Queue(name, options);
  queue.on('error', logError(`queue ${name}`));
  const state = new QueueState(name, queue);
  await queue.waitUntilReady();
  // Count from the stream's last entry now, exactly: QueueEvents' default `$` would miss
  // what is written between its start and its first blocking read.
  const last = await redis.xrevrange(queue.keys.events, '+', '-', 'COUNT', 1);
  const lastEventId = last.length > 0 ? last[0][0] : '0-0';
  state.events = new CountingQueueEvents(
    name,
    { connection, prefix, lastEventId, blockingTimeout: 1000 },
    state.eventCounts,
  );
  state.events.on('error', logError(`queue events ${name}`));
  await state.events.waitUntilReady();
  return state;
}

async function clientNames() {
  const list = await redis.client('LIST');
  return list
    .split('\n')
    .map((line) => / name=(\S*)/.exec(line)?.[1])
    .filter((name) => name);
}

async function until(condition, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

function processor(queueName) {
  return async (job) => {
    const data = job.data ?? {};
    if (data.ms) await sleep(Number(data.ms));
    if (data.fail) {
      throw new Error(`simulated failure of ${queueName}/${job.name} #${job.id}`);
    }
    if (job.attemptsMade < Number(data.failAttempts ?? 0)) {
      throw new Error(
        `simulated failure of ${queueName}/${job.name} #${job.id}, attempt ${job.attemptsMade + 1}`,
      );
    }
    return { ok: true, processedAt: Date.now() };
  };
}

function jobSpec(spec) {
  if (spec === null || typeof spec !== 'object') throw new Error('a job must be an object');
  return { name: spec.name ?? 'job', data: spec.data ?? {}, opts: spec.opts ?? {} };
}

function requireWorker(handle) {
  const entry = workers.get(handle);
  if (!entry) throw new Error(`no worker ${JSON.stringify(handle)}`);
  return entry;
}

const commands = {
  async ping() {
    return { ok: true, prefix, queues: [...queues.keys()], workers: [...workers.keys()] };
  },

  async open({ queue, eventsMaxLen }) {
    if (eventsMaxLen !== undefined && !(Number.isInteger(eventsMaxLen) && eventsMaxLen > 0)) {
      throw new Error('"eventsMaxLen" must be a positive integer');
    }
    await openQueue(queue, { eventsMaxLen });
    return { ok: true };
  },

  async add({ queue, ...spec }) {
    const { name, data, opts } = jobSpec(spec);
    const job = await (await openQueue(queue)).queue.add(name, data, opts);
    return { jobId: job.id };
  },

  async addBulk({ queue, jobs }) {
    if (!Array.isArray(jobs)) throw new Error('"jobs" must be a list');
    const added = await (await openQueue(queue)).queue.addBulk(jobs.map(jobSpec));
    return { jobIds: added.map((job) => job.id) };
  },

  async startWorker({ queue, worker, concurrency = 1, anonymous = false, timeoutMs = 10000 }) {
    const state = await openQueue(queue);
    const handle = worker ?? `${queue}-worker-${++workerSerial}`;
    if (workers.has(handle)) throw new Error(`worker ${handle} is already running`);
    const options = { connection, prefix, concurrency };
    if (!anonymous) options.name = handle;
    const instance = new Worker(queue, processor(queue), options);
    workers.set(handle, { worker: instance, queue });
    instance.on('error', logError(`worker ${handle}`));
    instance.on('completed', () => {
      state.finished.completed += 1;
      state.notify();
    });
    instance.on('failed', (job) => {
      // Also emitted for an attempt that BullMQ will retry; only then is finishedOn unset.
      if (job && typeof job.finishedOn === 'number') state.finished.failed += 1;
      else state.finished.retried += 1;
      state.notify();
    });
    await instance.waitUntilReady();
    // Return once the worker's named connection shows in CLIENT LIST, as getWorkers() reads it.
    const clientName = instance.clientName(anonymous ? '' : `:w:${handle}`);
    await until(
      async () => (await clientNames()).includes(clientName),
      timeoutMs,
      `worker connection ${clientName}`,
    );
    return { worker: handle, clientName };
  },

  async closeWorker({ worker, force = false }) {
    const entry = requireWorker(worker);
    await entry.worker.close(force);
    workers.delete(worker);
    return { ok: true };
  },

  async pause({ queue }) {
    await (await openQueue(queue)).queue.pause();
    return { ok: true };
  },

  async resume({ queue }) {
    await (await openQueue(queue)).queue.resume();
    return { ok: true };
  },

  async upsertScheduler({ queue, schedulerId, pattern, every, name, data, opts }) {
    if ((pattern === undefined) === (every === undefined)) {
      throw new Error('give exactly one of "pattern" and "every"');
    }
    const repeat = pattern !== undefined ? { pattern } : { every };
    const job = await (await openQueue(queue)).queue.upsertJobScheduler(schedulerId, repeat, {
      name: name ?? schedulerId,
      data: data ?? {},
      opts: opts ?? {},
    });
    return { jobId: job?.id ?? null };
  },

  async removeScheduler({ queue, schedulerId }) {
    const removed = await (await openQueue(queue)).queue.removeJobScheduler(schedulerId);
    return { removed };
  },

  async state({ queue }) {
    const state = await openQueue(queue);
    const q = state.queue;
    const [counts, paused, workerClients, schedulers] = await Promise.all([
      q.getJobCounts(
        'waiting',
        'active',
        'completed',
        'failed',
        'delayed',
        'prioritized',
        'waiting-children',
        'paused',
      ),
      q.isPaused(),
      q.getWorkers(),
      q.getJobSchedulers(0, -1, true),
    ]);
    return {
      counts,
      paused,
      workers: workerClients.length,
      // getWorkers() puts the queue's name in `name`; the connection's name is `rawname`.
      workerNames: workerClients.map((client) => client.rawname),
      schedulers,
      events: { ...state.eventCounts },
      finished: { ...state.finished },
    };
  },

  async jobState({ queue, jobId }) {
    const state = await openQueue(queue);
    const job = await state.queue.getJob(String(jobId));
    if (!job) return { state: 'unknown' };
    return {
      state: await job.getState(),
      attemptsMade: job.attemptsMade,
      attemptsStarted: job.attemptsStarted,
      failedReason: job.failedReason ?? null,
    };
  },

  async waitFinished({ queue, count, timeoutMs = 30000 }) {
    if (!Number.isInteger(count) || count < 0) throw new Error('"count" must be an integer >= 0');
    const state = await openQueue(queue);
    if (state.finishedCount < count) {
      await new Promise((resolve, reject) => {
        const waiter = () => {
          if (state.finishedCount >= count) done(resolve);
        };
        const timer = setTimeout(
          () =>
            done(() =>
              reject(
                new Error(
                  `timed out after ${timeoutMs} ms: ${state.finishedCount} of ${count} jobs ` +
                    `finished on ${queue} (${JSON.stringify(state.finished)})`,
                ),
              ),
            ),
          timeoutMs,
        );
        const done = (then) => {
          clearTimeout(timer);
          state.waiters.delete(waiter);
          then();
        };
        state.waiters.add(waiter);
      });
    }
    return { finished: { ...state.finished } };
  },

  async waitEvents({ queue, event, count, timeoutMs = 30000 }) {
    const state = await openQueue(queue);
    await until(
      () => (state.eventCounts[event] ?? 0) >= count,
      timeoutMs,
      `${count} ${event} events on ${queue}`,
    );
    return { events: { ...state.eventCounts } };
  },

  async trimEvents({ queue, maxLen }) {
    const removed = await (await openQueue(queue)).queue.trimEvents(maxLen);
    return { removed };
  },

  async obliterate({ queue, force = true }) {
    const state = await openQueue(queue);
    await state.queue.obliterate({ force });
    return { ok: true };
  },

  async quit() {
    return { ok: true, quitting: true };
  },
};

async function closeEverything() {
  const states = await Promise.all(
    [...queues.values()].map((opening) => opening.catch(() => null)),
  );
  const closing = [
    ...[...workers.values()].map(({ worker }) => worker.close(true)),
    ...states
      .filter((state) => state !== null)
      .flatMap((state) => [state.events.close(), state.queue.close()]),
  ].map((promise) => Promise.resolve(promise).catch(logError('closing')));
  await Promise.all(closing);
  await redis.quit().catch(logError('closing'));
}

// Bounded: with Redis gone, closing could otherwise wait for its reconnection forever.
async function closeAll(timeoutMs) {
  await Promise.race([closeEverything(), sleep(timeoutMs)]);
}

function answer(id, body) {
  process.stdout.write(`${JSON.stringify({ id, ...body })}\n`);
}

async function handle(line) {
  let request;
  try {
    request = JSON.parse(line);
  } catch (error) {
    answer(null, { error: `not JSON: ${error.message}` });
    return;
  }
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    answer(null, { error: 'a command must be a JSON object' });
    return;
  }
  const { id = null, cmd, ...args } = request;
  const command = Object.hasOwn(commands, cmd) ? commands[cmd] : undefined;
  if (!command) {
    answer(id, { error: `unknown command ${JSON.stringify(cmd)}` });
    return;
  }
  try {
    const result = await command(args);
    if (cmd === 'quit') {
      await closeAll(5000);
      answer(id, result);
      process.exit(0);
    }
    answer(id, result);
  } catch (error) {
    answer(id, { error: error?.message ?? String(error) });
  }
}

process.on('unhandledRejection', logError('unhandled rejection'));
process.on('uncaughtException', logError('uncaught exception'));

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  if (line.trim() !== '') handle(line);
});
lines.on('close', async () => {
  await closeAll(5000);
  process.exit(0);
});
answer(null, { ready: true, prefix });
