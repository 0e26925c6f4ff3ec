//! Translation between convoq's jobs and BullMQ's wire forms: the msgpack arguments BullMQ's
//! scripts take, and the job hash (`bull:<queue>:<id>`) they store, field by field as Node
//! BullMQ writes and reads it.
//!
//! Hash fields used: `name`, `data` (the payload as `JSON.stringify` writes it), `opts` (the job
//! options as JSON), `timestamp` (created, ms), `delay`, `priority`, `processedOn`, `finishedOn`,
//! `atm` (attempts made: attempts that ended), `ats` (attempts started), `stc` (stalls),
//! `failedReason`, `returnvalue` (JSON), `defa` (a failure deferred to the next worker).

use std::collections::HashMap;

use rmp::encode::{
    write_array_len, write_bool, write_f64, write_map_len, write_nil, write_sint, write_str,
    write_uint,
};
use serde_json::Value;

use crate::clock::ms_to_datetime;
use crate::error::{QueueError, Result};
use crate::job::{Backoff, BackoffKind, Job, JobOptions, JobState, KeepJobs};

/// BullMQ's metrics retention (one week of one-minute points), passed to `moveToFinished` so
/// that BullMQ keeps its `metrics:completed` / `metrics:failed` counters, which convoq reads as
/// lifetime totals.
pub(crate) const MAX_METRICS_POINTS: u64 = 60 * 24 * 7;

/// Writes to a `Vec` cannot fail; this keeps the packing code free of `unwrap`s.
fn ok<T, E: std::fmt::Debug>(r: std::result::Result<T, E>) {
    let r = r.map(|_| ());
    debug_assert!(r.is_ok(), "{r:?}");
}

/// ARGV[1] of the add scripts: `[prefix, customId, name, timestamp, parentKey, parentDepsKey,
/// parent, repeatJobKey, deduplicationKey]`.
pub(crate) fn pack_add_args(key_prefix: &str, custom_id: &str, name: &str, ts: i64) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + name.len() + custom_id.len());
    ok(write_array_len(&mut b, 9));
    ok(write_str(&mut b, key_prefix));
    ok(write_str(&mut b, custom_id));
    ok(write_str(&mut b, name));
    ok(write_uint(&mut b, ts.max(0) as u64));
    for _ in 0..5 {
        ok(write_nil(&mut b));
    }
    b
}

fn write_keep(b: &mut Vec<u8>, keep: KeepJobs) {
    match keep {
        KeepJobs::RemoveAtOnce => ok(write_bool(b, true)),
        KeepJobs::Keep {
            count: None,
            age_secs: None,
        } => ok(write_bool(b, false)),
        KeepJobs::Keep {
            count: Some(n),
            age_secs: None,
        } => ok(write_uint(b, n)),
        KeepJobs::Keep { count, age_secs } => {
            ok(write_map_len(
                b,
                count.is_some() as u32 + age_secs.is_some() as u32,
            ));
            if let Some(n) = count {
                ok(write_str(b, "count"));
                ok(write_uint(b, n));
            }
            if let Some(a) = age_secs {
                ok(write_str(b, "age"));
                ok(write_uint(b, a));
            }
        }
    }
}

/// ARGV[3] of the add scripts: the job options, stored by the script as the hash's `opts` JSON
/// under Node BullMQ's names. `timeout` and `backoff.jitter` are convoq's (Node BullMQ knows
/// `jitter` and ignores `timeout`).
pub(crate) fn pack_job_opts(opts: &JobOptions) -> Vec<u8> {
    let mut entries: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut push = |key: &'static str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = Vec::new();
        f(&mut v);
        entries.push((key, v));
    };
    if let Some(a) = opts.attempts {
        push("attempts", &|b| ok(write_uint(b, a as u64)));
    }
    if let Some(bo) = opts.backoff {
        push("backoff", &|b| {
            ok(write_map_len(b, if bo.jitter > 0.0 { 3 } else { 2 }));
            ok(write_str(b, "type"));
            ok(write_str(
                b,
                match bo.kind {
                    BackoffKind::Fixed => "fixed",
                    BackoffKind::Exponential => "exponential",
                },
            ));
            ok(write_str(b, "delay"));
            ok(write_uint(b, bo.delay));
            if bo.jitter > 0.0 {
                ok(write_str(b, "jitter"));
                ok(write_f64(b, bo.jitter));
            }
        });
    }
    if let Some(d) = opts.delay.filter(|d| *d > 0) {
        push("delay", &|b| ok(write_uint(b, d)));
    }
    if let Some(p) = opts.priority.filter(|p| *p > 0) {
        push("priority", &|b| ok(write_uint(b, p as u64)));
    }
    if let Some(id) = opts.job_id.as_deref() {
        push("jobId", &|b| ok(write_str(b, id)));
    }
    if let Some(k) = opts.remove_on_complete {
        push("removeOnComplete", &|b| write_keep(b, k));
    }
    if let Some(k) = opts.remove_on_fail {
        push("removeOnFail", &|b| write_keep(b, k));
    }
    if let Some(t) = opts.timeout {
        push("timeout", &|b| ok(write_uint(b, t)));
    }
    let mut b = Vec::with_capacity(128);
    ok(write_map_len(&mut b, entries.len() as u32));
    for (k, v) in entries {
        ok(write_str(&mut b, k));
        b.extend_from_slice(&v);
    }
    b
}

/// The `opts` map of `moveToActive`: the lease token and its length, and the worker's name
/// (stored as the job's `pb`, "processed by").
pub(crate) fn pack_active_opts(token: &str, lease_ms: u64, worker: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    ok(write_map_len(&mut b, 3));
    ok(write_str(&mut b, "token"));
    ok(write_str(&mut b, token));
    ok(write_str(&mut b, "lockDuration"));
    ok(write_uint(&mut b, lease_ms));
    ok(write_str(&mut b, "name"));
    ok(write_str(&mut b, worker));
    b
}

/// The `opts` map of `moveToFinished`.
pub(crate) fn pack_finish_opts(
    token: &str,
    keep: KeepJobs,
    lease_ms: u64,
    attempts: u32,
    worker: &str,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(160);
    ok(write_map_len(&mut b, 10));
    ok(write_str(&mut b, "token"));
    ok(write_str(&mut b, token));
    ok(write_str(&mut b, "keepJobs"));
    match keep {
        KeepJobs::RemoveAtOnce => {
            ok(write_map_len(&mut b, 1));
            ok(write_str(&mut b, "count"));
            ok(write_uint(&mut b, 0));
        }
        KeepJobs::Keep { count, age_secs } => {
            ok(write_map_len(&mut b, 1 + age_secs.is_some() as u32));
            ok(write_str(&mut b, "count"));
            match count {
                Some(n) => ok(write_uint(&mut b, n)),
                None => ok(write_sint(&mut b, -1)),
            }
            if let Some(a) = age_secs {
                ok(write_str(&mut b, "age"));
                ok(write_uint(&mut b, a));
            }
        }
    }
    ok(write_str(&mut b, "lockDuration"));
    ok(write_uint(&mut b, lease_ms));
    ok(write_str(&mut b, "attempts"));
    ok(write_uint(&mut b, attempts as u64));
    ok(write_str(&mut b, "maxMetricsSize"));
    ok(write_uint(&mut b, MAX_METRICS_POINTS));
    for key in ["fpof", "cpof", "idof", "rdof"] {
        ok(write_str(&mut b, key));
        ok(write_bool(&mut b, false));
    }
    ok(write_str(&mut b, "name"));
    ok(write_str(&mut b, worker));
    b
}

/// The `opts` map of `moveToDelayed`.
pub(crate) fn pack_delay_opts(token: &str, lease_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    ok(write_map_len(&mut b, 2));
    ok(write_str(&mut b, "token"));
    ok(write_str(&mut b, token));
    ok(write_str(&mut b, "lockDuration"));
    ok(write_uint(&mut b, lease_ms));
    b
}

/// A flat `[field, value, …]` msgpack array of hash fields for the scripts' "fields to update".
pub(crate) fn pack_fields(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    ok(write_array_len(&mut b, (fields.len() * 2) as u32));
    for (k, v) in fields {
        ok(write_str(&mut b, k));
        ok(write_str(&mut b, v));
    }
    b
}

fn int(fields: &HashMap<String, String>, key: &str) -> Option<i64> {
    fields
        .get(key)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|f| f as i64)
}

fn keep_from_json(v: &Value) -> Option<KeepJobs> {
    match v {
        Value::Bool(true) => Some(KeepJobs::RemoveAtOnce),
        Value::Bool(false) => Some(KeepJobs::FOREVER),
        Value::Number(n) => n.as_u64().map(|n| KeepJobs::Keep {
            count: Some(n),
            age_secs: None,
        }),
        Value::Object(m) => Some(KeepJobs::Keep {
            count: m.get("count").and_then(Value::as_u64),
            age_secs: m.get("age").and_then(Value::as_u64),
        }),
        _ => None,
    }
}

/// Reads the options of a stored job leniently: Node producers store options convoq does not
/// know (`lifo`, `stackTraceLimit`, …), and `backoff` may be a bare number (a fixed delay).
pub(crate) fn opts_from_json(raw: Option<&String>) -> JobOptions {
    let Some(Value::Object(m)) = raw.and_then(|r| serde_json::from_str::<Value>(r).ok()) else {
        return JobOptions::default();
    };
    let backoff = match m.get("backoff") {
        Some(Value::Number(n)) => n.as_u64().map(|delay| Backoff {
            kind: BackoffKind::Fixed,
            delay,
            jitter: 0.0,
        }),
        Some(Value::Object(b)) => Some(Backoff {
            kind: match b.get("type").and_then(Value::as_str) {
                Some("exponential") => BackoffKind::Exponential,
                _ => BackoffKind::Fixed,
            },
            delay: b.get("delay").and_then(Value::as_u64).unwrap_or(0),
            jitter: b.get("jitter").and_then(Value::as_f64).unwrap_or(0.0),
        }),
        _ => None,
    };
    JobOptions {
        attempts: m.get("attempts").and_then(Value::as_u64).map(|a| a as u32),
        backoff,
        delay: m.get("delay").and_then(Value::as_u64).filter(|d| *d > 0),
        priority: m
            .get("priority")
            .and_then(Value::as_u64)
            .filter(|p| *p > 0)
            .map(|p| p as u32),
        job_id: m.get("jobId").and_then(Value::as_str).map(str::to_owned),
        remove_on_complete: m.get("removeOnComplete").and_then(keep_from_json),
        remove_on_fail: m.get("removeOnFail").and_then(keep_from_json),
        timeout: m.get("timeout").and_then(Value::as_u64),
    }
}

/// Where a job stands, as found in the queue's sets, and when a delayed job comes due.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub(crate) state: JobState,
    pub(crate) due_ms: Option<i64>,
}

/// Maps a stored job hash to a [`Job`].
///
/// # Errors
/// [`QueueError::Corrupt`] when the hash has no `name` or unreadable `data`.
pub(crate) fn job_from_hash(
    queue: &str,
    id: &str,
    fields: &HashMap<String, String>,
    placement: Placement,
) -> Result<Job> {
    let name = fields
        .get("name")
        .cloned()
        .ok_or_else(|| QueueError::Corrupt(format!("job {queue}/{id} has no name")))?;
    let data = match fields.get("data") {
        Some(raw) => serde_json::from_str(raw)
            .map_err(|e| QueueError::Corrupt(format!("job {queue}/{id}: data: {e}")))?,
        None => Value::Null,
    };
    let opts = opts_from_json(fields.get("opts"));
    let created = int(fields, "timestamp").unwrap_or(0);
    let started = int(fields, "ats").unwrap_or(0).max(0) as u32;
    let ended = int(fields, "atm").unwrap_or(0).max(0) as u32;
    let state = placement.state;
    let result = if state == JobState::Completed {
        fields
            .get("returnvalue")
            .map(|r| serde_json::from_str(r).unwrap_or_else(|_| Value::String(r.clone())))
    } else {
        None
    };
    let failed_reason = fields
        .get("failedReason")
        .filter(|r| !r.is_empty())
        .cloned();
    let available = match placement.due_ms {
        Some(due) => due,
        None => {
            // Saturating: a hash written by another client may hold any integers.
            let delay = int(fields, "delay").unwrap_or(0).max(0);
            created.saturating_add(if state == JobState::Delayed { delay } else { 0 })
        }
    };
    Ok(Job {
        id: id.to_owned(),
        queue: queue.to_owned(),
        name,
        data,
        opts,
        state,
        attempts_made: started.max(ended),
        stalled_count: int(fields, "stc").unwrap_or(0).max(0) as u32,
        result,
        failed_reason,
        created_at: ms_to_datetime(created),
        available_at: ms_to_datetime(available),
        processed_at: int(fields, "processedOn").map(ms_to_datetime),
        finished_at: if state.is_finished() {
            int(fields, "finishedOn").map(ms_to_datetime)
        } else {
            None
        },
        lease_expires_at: None,
        lease_holder: None,
    })
}

/// A flat `[field, value, …]` reply (as `HGETALL` inside a script returns it) as a map.
pub(crate) fn pairs_to_map(values: &[redis::Value]) -> HashMap<String, String> {
    let mut map = HashMap::with_capacity(values.len() / 2);
    for pair in values.chunks(2) {
        if let [k, v] = pair {
            if let (Some(k), Some(v)) = (value_str(k), value_str(v)) {
                map.insert(k, v);
            }
        }
    }
    map
}

/// A Redis reply as text, when it is text or a number.
pub(crate) fn value_str(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        redis::Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

/// A Redis reply as an integer, when it is one (or text holding one).
pub(crate) fn value_int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(i) => Some(*i),
        other => value_str(other).and_then(|s| s.parse::<f64>().ok().map(|f| f as i64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A field value a Node producer, an older BullMQ or a hostile writer may leave.
    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("null".to_owned()),
            Just("NaN".to_owned()),
            Just("-1".to_owned()),
            Just("99999999999999999999999999".to_owned()),
            Just("1e308".to_owned()),
            Just("{\"attempts\":-5,\"backoff\":{\"type\":\"custom\"}}".to_owned()),
            Just("[1,2,3]".to_owned()),
            Just("{".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            "\\PC{0,40}",
        ]
    }

    proptest! {
        /// Whatever a job hash holds, reading it never panics: it is a job, or `Corrupt`; and
        /// the history derived from it is bounded whatever its counters claim.
        #[test]
        fn any_job_hash_reads_as_a_job_or_corrupt(
            fields in proptest::collection::hash_map(
                prop_oneof![
                    Just("name"), Just("data"), Just("opts"), Just("timestamp"),
                    Just("delay"), Just("priority"), Just("attemptsMade"), Just("atm"),
                    Just("ats"), Just("stc"),
                    Just("stalledCounter"), Just("processedOn"), Just("finishedOn"),
                    Just("returnvalue"), Just("failedReason"), Just("stacktrace"),
                ].prop_map(str::to_owned),
                hostile(),
                0..14,
            ),
            state in prop_oneof![
                Just(JobState::Waiting), Just(JobState::Active), Just(JobState::Delayed),
                Just(JobState::Completed), Just(JobState::Failed), Just(JobState::Paused),
            ],
            due_ms in proptest::option::of(any::<i64>()),
        ) {
            let placement = Placement { state, due_ms };
            match job_from_hash("q", "1", &fields, placement) {
                Ok(job) => {
                    prop_assert!(fields.contains_key("name"));
                    prop_assert_eq!(job.state, state);
                    let history = super::super::history::derive(&job);
                    let bound = 3 + 2 * super::super::history::MAX_DERIVED_ATTEMPTS as usize;
                    prop_assert!(history.len() <= bound, "{} events", history.len());
                }
                Err(QueueError::Corrupt(_)) => {}
                Err(e) => prop_assert!(false, "not Corrupt: {e}"),
            }
            let _ = opts_from_json(fields.get("opts"));
        }
    }

    #[test]
    fn a_hash_claiming_billions_of_attempts_derives_its_latest_ones() {
        let fields: HashMap<String, String> = [
            ("name", "n"),
            ("timestamp", "9223372036854775000"),
            ("delay", "9223372036854775000"),
            ("ats", "4000000000"),
            ("failedReason", "boom"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let placement = Placement {
            state: JobState::Delayed,
            due_ms: None,
        };
        let job = job_from_hash("q", "1", &fields, placement).expect("a job");
        assert_eq!(job.attempts_made, 4_000_000_000);
        let history = super::super::history::derive(&job);
        let max = super::super::history::MAX_DERIVED_ATTEMPTS as usize;
        assert_eq!(history.len(), 1 + 2 * max);
        assert_eq!(history.last().map(|e| e.attempt), Some(4_000_000_000));
    }

    #[test]
    fn reads_node_options_leniently() {
        let raw = r#"{"attempts":5,"backoff":{"type":"exponential","delay":1000,"jitter":0.5},
            "lifo":false,"removeOnComplete":{"count":10,"age":60},"removeOnFail":true,"jobId":"x"}"#
            .to_owned();
        let o = opts_from_json(Some(&raw));
        assert_eq!(o.attempts, Some(5));
        assert_eq!(o.backoff, Some(Backoff::DEFAULT));
        assert_eq!(
            o.remove_on_complete,
            Some(KeepJobs::Keep {
                count: Some(10),
                age_secs: Some(60)
            })
        );
        assert_eq!(o.remove_on_fail, Some(KeepJobs::RemoveAtOnce));
        assert_eq!(o.job_id.as_deref(), Some("x"));
        let bare = r#"{"backoff":250}"#.to_owned();
        assert_eq!(opts_from_json(Some(&bare)).backoff.unwrap().delay, 250);
    }

    #[test]
    fn maps_a_node_completed_job() {
        let fields: HashMap<String, String> = [
            ("name", "create_conversation"),
            ("data", r#"{"userId":"u1","title":"t"}"#),
            ("opts", r#"{"attempts":3}"#),
            ("timestamp", "1000"),
            ("processedOn", "1500"),
            ("finishedOn", "1600"),
            ("atm", "1"),
            ("ats", "1"),
            ("returnvalue", r#"{"success":true}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let placement = Placement {
            state: JobState::Completed,
            due_ms: None,
        };
        let job = job_from_hash("database", "7", &fields, placement).unwrap();
        assert_eq!(job.result, Some(serde_json::json!({"success": true})));
        assert_eq!(job.attempts_made, 1);
        assert_eq!(job.finished_at.unwrap().timestamp_millis(), 1600);
        assert_eq!(
            serde_json::to_string(&job.data).unwrap(),
            r#"{"userId":"u1","title":"t"}"#,
            "key order is kept, as Node wrote it"
        );
    }
}
