#!/usr/bin/env node
// Reads angelstream's tick streams from Redis and prints one typed JSON object per tick (per line).
//
//   node consume.js [--count N] [--from ID] EXCHANGE:SYMBOL...
//   REDIS_URL=redis://host:6379/0 node consume.js --from '$' NSE:SBIN-EQ 'NSE:Nifty 50'
//
// The contract it implements is docs/streams.md (one stream per symbol, `ticks:{EXCHANGE}:{SYMBOL}`,
// every value a string). Each printed object holds the entry ID (`id`) and every field, typed:
//   * integers (seq, exch_ts, recv_ts, ltq, volume, ltt, oi, and the qty/orders of each level) are
//     JSON numbers; parseEntry() gives a Number, or a BigInt when the value is beyond 2^53 - 1, and
//     the printed digits are always exact;
//   * prices (rupees) and the decimal numbers (total_buy_qty, total_sell_qty, oi_change_pct) stay
//     strings, exactly as written ("600.05", "83.1234567"): never turned into floats;
//   * bids / asks are arrays of {price (string), qty, orders}, best first;
//   * v, token, exchange, symbol, mode are strings; a field this reader does not know is kept as its string.
// An entry whose schema version `v` is not 1 is refused: its units may differ.
//
// --from: read after this entry ID (exclusive). Default 0-0: every entry still in the stream, then
// new ones. `$`: only ticks written after the start. To resume after a restart, pass the last `id`
// you processed. --count N: stop after N ticks in total. SIGINT/SIGTERM: stop, exit 0.
// Errors: one line on stderr; exit 2 for a usage error, 1 for anything else.

import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

export const SCHEMA_VERSION = '1';

const USAGE = 'usage: node consume.js [--count N] [--from ID] EXCHANGE:SYMBOL...';

/** Fields that are strings. */
const STRINGS = ['v', 'token', 'exchange', 'symbol', 'mode'];
/** Fields that are integers (epoch ms / µs, quantities, sequence numbers). */
const INTS = ['seq', 'exch_ts', 'recv_ts', 'ltq', 'volume', 'ltt', 'oi'];
/** Fields that are prices in rupees: exact decimal strings. */
const PRICES = ['ltp', 'atp', 'open', 'high', 'low', 'close', 'upper_circuit', 'lower_circuit', 'high_52w', 'low_52w'];
/** Fields that are decimal numbers (a float64's shortest text, e.g. "1234.0", "1.5e+20", "nan"): strings. */
const NUMBERS = ['total_buy_qty', 'total_sell_qty', 'oi_change_pct'];
/** Fields that are best-five levels: compact JSON [[price, qty, orders], ...]. */
const LEVELS = ['bids', 'asks'];
/** Fields every entry has, in every mode. */
const REQUIRED = ['v', 'token', 'exchange', 'symbol', 'mode', 'seq', 'exch_ts', 'ltp', 'recv_ts'];

const INT_RE = /^-?\d+$/;
const PRICE_RE = /^-?\d+(?:\.\d+)?$/;
const NUMBER_RE = /^(?:-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|-?inf|nan)$/;
const ID_RE = /^\d+(?:-\d+)?$/;
// One level, `[price,qty,orders]`, with the price's text kept as written.
const LEVEL_RE = /\s*\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]\s*/y;

/** A malformed entry, a bad argument, or Redis refusing: the message is one line fit for a user. */
export class ConsumeError extends Error {}

/** "123" → 123, or 123n when beyond Number.MAX_SAFE_INTEGER: exact either way. */
export function parseInt64(text, what) {
  if (!INT_RE.test(text)) throw new ConsumeError(`${what} is not an integer: ${JSON.stringify(text)}`);
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : BigInt(text);
}

/** `[[600.05,100,3],…]` → [{price: "600.05", qty: 100, orders: 3}, …] (price text exactly as written). */
export function parseLevels(text, what) {
  const bad = () => new ConsumeError(`${what} is not a list of [price, qty, orders]: ${JSON.stringify(text)}`);
  const inner = text.trim();
  if (!inner.startsWith('[') || !inner.endsWith(']')) throw bad();
  const body = inner.slice(1, -1);
  const levels = [];
  if (body.trim() === '') return levels;
  LEVEL_RE.lastIndex = 0;
  for (;;) {
    const m = LEVEL_RE.exec(body);
    if (m === null) throw bad();
    levels.push({ price: m[1], qty: parseInt64(m[2], what), orders: parseInt64(m[3], what) });
    if (LEVEL_RE.lastIndex === body.length) return levels;
    if (body[LEVEL_RE.lastIndex] !== ',') throw bad();
    LEVEL_RE.lastIndex += 1;
  }
}

/**
 * One stream entry (as node-redis returns it: an ID and an object of string fields), typed.
 * Throws ConsumeError naming the field for a malformed entry or an unknown schema version.
 */
export function parseEntry(id, fields) {
  const tick = { id };
  const where = (name) => `entry ${id}: field ${name}`;
  for (const name of REQUIRED) {
    if (!Object.hasOwn(fields, name)) throw new ConsumeError(`entry ${id}: field ${name} is missing`);
  }
  if (fields.v !== SCHEMA_VERSION) {
    throw new ConsumeError(
      `entry ${id}: schema version ${JSON.stringify(fields.v)} is not ${SCHEMA_VERSION}, the one this reader knows`,
    );
  }
  for (const [name, text] of Object.entries(fields)) {
    if (INTS.includes(name)) {
      tick[name] = parseInt64(text, where(name));
    } else if (PRICES.includes(name)) {
      if (!PRICE_RE.test(text)) throw new ConsumeError(`${where(name)} is not a decimal price: ${JSON.stringify(text)}`);
      tick[name] = text;
    } else if (NUMBERS.includes(name)) {
      if (!NUMBER_RE.test(text)) throw new ConsumeError(`${where(name)} is not a number: ${JSON.stringify(text)}`);
      tick[name] = text;
    } else if (LEVELS.includes(name)) {
      tick[name] = parseLevels(text, where(name));
    } else {
      tick[name] = text; // STRINGS, and fields newer than this reader: kept as written
    }
  }
  return tick;
}

function encode(value) {
  if (typeof value === 'bigint') return value.toString(); // exact digits: JSON numbers have no size limit
  if (Array.isArray(value)) return `[${value.map(encode).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}:${encode(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** A parsed tick as one line of JSON (BigInts as exact JSON numbers). */
export function toJsonLine(tick) {
  return encode(tick);
}

function usage(message) {
  const error = new ConsumeError(`${oneLine(message)} (${USAGE})`);
  error.exitCode = 2;
  return error;
}

/** argv (without node and the script) → {count, from, keys}. */
export function parseCommandLine(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: { count: { type: 'string' }, from: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      allowPositionals: true,
      strict: true,
    });
  } catch (error) {
    throw usage(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) return { help: true };
  let count = null;
  if (values.count !== undefined) {
    if (!/^\d+$/.test(values.count) || Number(values.count) < 1) {
      throw usage(`--count must be a positive integer, got ${JSON.stringify(values.count)}`);
    }
    count = Number(values.count);
  }
  const from = values.from ?? '0-0';
  if (from !== '$' && !ID_RE.test(from)) {
    throw usage(`--from must be an entry ID (like 1718000000000-0) or $, got ${JSON.stringify(from)}`);
  }
  if (positionals.length === 0) throw usage('name at least one EXCHANGE:SYMBOL');
  const keys = [];
  for (const key of positionals) {
    const at = key.indexOf(':');
    if (at <= 0 || at === key.length - 1) {
      throw usage(`${JSON.stringify(key)} is not EXCHANGE:SYMBOL (e.g. NSE:SBIN-EQ)`);
    }
    if (!keys.includes(key)) keys.push(key);
  }
  return { help: false, count, from, keys };
}

function oneLine(error) {
  return String(error?.message ?? error).split(/\s+/).join(' ').trim() || String(error?.name);
}

/**
 * Read the streams of `keys` from `from` and hand each tick (parsed) to `onTick`, in stream order,
 * until `count` ticks (null: forever) or until `signal` aborts. Resolves with the number of ticks.
 */
export async function consume({ url, keys, from = '0-0', count = null, onTick, signal }) {
  const { createClient } = await import('redis'); // here, so a usage error needs no driver loaded
  let client;
  try {
    client = createClient({ url, socket: { reconnectStrategy: false, connectTimeout: 5000 } });
  } catch (error) {
    throw new ConsumeError(`REDIS_URL is invalid: ${oneLine(error)}`);
  }
  client.on('error', () => {}); // every failure also rejects the command in flight; reported there
  const stopped = Symbol('stopped');
  // A Redis call; its failure as a ConsumeError, or `stopped` once `signal` has aborted.
  const ask = async (call, say = (detail) => `Redis failed: ${detail}`) => {
    try {
      return await call();
    } catch (error) {
      if (signal?.aborted) throw stopped;
      throw new ConsumeError(say(oneLine(error)));
    }
  };
  const stop = () => {
    if (client.isOpen) client.destroy(); // rejects the blocking XREAD in flight
  };
  const streams = keys.map((key) => `ticks:${key}`);
  let seen = 0;
  try {
    signal?.addEventListener('abort', stop, { once: true });
    await ask(
      () => client.connect(),
      (detail) => `cannot reach Redis (${detail}): is it running, and is REDIS_URL right?`,
    );
    if (signal?.aborted) return seen;
    const positions = new Map();
    for (const stream of streams) {
      // `$` becomes each stream's newest ID now, so nothing written between two XREADs is missed.
      const newest = from === '$' ? await ask(() => client.xRevRange(stream, '+', '-', { COUNT: 1 })) : [];
      positions.set(stream, newest.length ? newest[0].id : from === '$' ? '0-0' : from);
    }
    while (count === null || seen < count) {
      const batch = count === null ? 500 : Math.min(500, count - seen);
      const reply = await ask(() =>
        client.xRead(streams.map((key) => ({ key, id: positions.get(key) })), { BLOCK: 0, COUNT: batch }),
      );
      for (const { name, messages } of reply ?? []) {
        for (const { id, message } of messages) {
          positions.set(name, id);
          let tick;
          try {
            tick = parseEntry(id, message);
          } catch (error) {
            throw new ConsumeError(`${name} ${error.message}`);
          }
          onTick(tick, name); // an exception of onTick ends consume() with that exception
          seen += 1;
          if (count !== null && seen >= count) return seen;
        }
      }
    }
    return seen;
  } catch (error) {
    if (error === stopped) return seen; // the stop we asked for
    throw error;
  } finally {
    signal?.removeEventListener('abort', stop);
    if (client.isOpen) client.destroy();
  }
}

export async function main(argv = process.argv.slice(2), env = process.env) {
  const controller = new AbortController();
  const onSignal = () => controller.abort();
  const onOutputError = (error) => {
    if (error.code !== 'EPIPE') throw error;
    controller.abort(); // the reader went away (`| head`): stop quietly
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  process.stdout.on('error', onOutputError);
  try {
    const options = parseCommandLine(argv);
    if (options.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    await consume({
      url: env.REDIS_URL || 'redis://localhost:6379/0',
      keys: options.keys,
      from: options.from,
      count: options.count,
      signal: controller.signal,
      onTick: (tick) => {
        if (!controller.signal.aborted) process.stdout.write(`${toJsonLine(tick)}\n`);
      },
    });
    return 0;
  } catch (error) {
    process.stderr.write(`consume.js: ${error instanceof ConsumeError ? error.message : oneLine(error)}\n`);
    return error.exitCode ?? 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.stdout.off('error', onOutputError);
  }
}

function invokedDirectly() {
  try {
    return process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  process.exitCode = await main();
}
