//! The operator's command line (`convoq queues`, `convoq jobs`) against the real binary, on
//! every engine: SQLite, Postgres (`CONVOQ_TEST_POSTGRES_URL`) and BullMQ on Redis
//! (`CONVOQ_TEST_REDIS_URL`, store on SQLite); the last two skip with a printed reason when
//! their URL is unset.
//!
//! A server makes a completed job and a failed one (a conversation for an unknown user) and
//! stops; the CLI, with no server running, lists, shows, follows, retries, pauses, removes and
//! promotes them, and its exit codes and audit records are checked. A server started again
//! runs the retried job, which the CLI follows across processes to its end.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use support::{request, Server, TestDatabase};

/// Runs `convoq ARGS` on `database_url` (and `env`), bounded in time.
async fn cli(database_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoq"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVOQ_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .arg("--database-url")
        .arg(database_url)
        .envs(env.iter().copied())
        .env("USER", "ops-tester");
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("convoq {args:?} did not end within 60 s"))
        .expect("run convoq")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `convoq ARGS --json`, expecting exit code 0 and one JSON document.
async fn cli_json(url: &str, env: &[(&str, &str)], args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(url, env, &all).await;
    assert_eq!(code(&out), 0, "convoq {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("convoq {args:?} printed no JSON ({e}): {}", stdout(&out)))
}

/// POSTs a conversation for `user` and waits (bounded) for its job to finish; the job's id.
async fn finished_job(port: u16, user: &str, want: &str) -> String {
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[],
        Some(&json!({"userId": user, "title": "cli", "personalityMode": "helpful"})),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["jobId"].as_str().expect("jobId").to_owned();
    let r = request(port, "GET", &format!("/api/jobs/{id}?wait=20"), &[], None)
        .await
        .expect("GET job");
    assert_eq!(r.json()["job"]["state"], want, "{}", r.text());
    id
}

/// The whole walk on one engine: `url` is the store's database, `env` adds the queue's.
async fn operator_walk(db: &TestDatabase, env: &[(&str, &str)]) {
    let url = db.url.as_str();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_on(dir.path(), url, env).await;
    support::put_user_u1(server.port).await;
    let done = finished_job(server.port, "u1", "completed").await;
    let failed = finished_job(server.port, "ghost", "failed").await;
    server.stop(Duration::from_secs(20)).await;

    // Counts and totals, by queue.
    let queues = cli_json(url, env, &["queues"]).await;
    let database = &queues["queues"][0];
    assert_eq!(database["name"], "database", "{queues}");
    assert!(database["totals"]["failed"].as_u64() >= Some(1), "{queues}");
    let table = stdout(&cli(url, env, &["queues"]).await);
    assert!(table.starts_with("QUEUE"), "{table}");
    assert!(table.contains("database"), "{table}");

    // Listing and showing.
    let listed = cli_json(url, env, &["jobs", "list", "--state", "failed"]).await;
    assert_eq!(listed["jobs"][0]["id"], failed.as_str(), "{listed}");
    let table = stdout(&cli(url, env, &["jobs", "list", "--state", "failed"]).await);
    assert!(
        table.contains(&failed) && table.contains("unknown user"),
        "{table}"
    );
    let shown = cli_json(url, env, &["jobs", "show", &failed]).await;
    assert_eq!(shown["state"], "failed", "{shown}");
    assert_eq!(shown["data"]["userId"], "ghost", "{shown}");
    let kinds: Vec<&str> = shown["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.last(), Some(&"failed"), "{shown}");
    let text = stdout(&cli(url, env, &["jobs", "show", &failed]).await);
    assert!(
        text.contains("failedReason") && text.contains("history:"),
        "{text}"
    );

    // Errors name the problem, with their exit codes.
    let out = cli(url, env, &["jobs", "show", "no-such-job"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no job no-such-job"),
        "{}",
        stderr(&out)
    );
    let out = cli(url, env, &["jobs", "list", "--state", "lost"]).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--state \"lost\""),
        "{}",
        stderr(&out)
    );
    let out = cli(url, env, &["queues", "pause", "nope"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = cli(url, env, &["jobs", "promote", &done]).await;
    assert_eq!(
        code(&out),
        4,
        "a completed job cannot be promoted: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("completed"), "{}", stderr(&out));

    // Retry: the failed job waits again; a second retry is refused (it has not failed now).
    // Several ids: each is tried, the first failure's code is the exit code.
    let out = cli(url, env, &["jobs", "retry", &failed, "no-such-job"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{failed}: retried (waiting)")),
        "{}",
        stdout(&out)
    );
    let out = cli(url, env, &["jobs", "retry", &failed]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    // Follow: no worker runs, so the job does not finish within the timeout.
    let out = cli(url, env, &["jobs", "follow", &failed, "--timeout", "1"]).await;
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    // The history is printed first (BullMQ derives it from the job's hash, which a retry
    // resets: there it starts at the retry).
    assert!(
        stdout(&out).contains("waiting"),
        "history first: {}",
        stdout(&out)
    );

    // Pause and resume.
    let paused = cli_json(url, env, &["queues", "pause", "database"]).await;
    assert_eq!(paused, json!({"queue": "database", "paused": true}));
    let queues = cli_json(url, env, &["queues"]).await;
    assert_eq!(queues["queues"][0]["paused"], true, "{queues}");
    cli_json(url, env, &["queues", "resume", "database"]).await;

    // A server started again runs the retried job; the CLI follows it to its end from
    // another process (history, then live events until `failed`, as one JSON object a line).
    let mut server = Server::start_on(dir.path(), url, env).await;
    let out = cli(
        url,
        env,
        &["jobs", "follow", &failed, "--json", "--timeout", "30"],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event a line"))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"active"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"failed"), "{kinds:?}");
    server.stop(Duration::from_secs(20)).await;

    // Every failed job at once, then removal.
    let all = cli_json(
        url,
        env,
        &["jobs", "retry", "--all-failed", "--queue", "database"],
    )
    .await;
    assert_eq!(all["retried"], 1, "{all}");
    let removed = cli_json(url, env, &["jobs", "remove", &failed]).await;
    assert_eq!(removed["state"], "removed", "{removed}");
    let out = cli(url, env, &["jobs", "show", &failed]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));

    // Every action is in the audit log under the operator's name.
    let store = db.open().await;
    let recorded = store
        .count("SELECT COUNT(*) FROM audit_log WHERE actor = 'cli:ops-tester'")
        .await;
    store.close().await;
    // pause, resume, retry, retry --all-failed, remove.
    assert_eq!(recorded, 5, "audit records of the CLI's actions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_sqlite() {
    let db = TestDatabase::sqlite().await.expect("sqlite");
    operator_walk(&db, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    operator_walk(&db, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_redis() {
    let Some(redis) = support::test_redis_url() else {
        return;
    };
    let db = TestDatabase::sqlite().await.expect("sqlite");
    let prefix = format!("cq-cli-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CONVOQ_QUEUE_URL", redis.as_str()),
        ("CONVOQ_QUEUE_PREFIX", prefix.as_str()),
    ];
    operator_walk(&db, &env).await;
}

#[tokio::test]
async fn unreachable_engine_exits_unavailable_and_says_where() {
    let out = cli(
        "postgres://nobody@127.0.0.1:1/none",
        &[("CONVOQ_PG_STATEMENT_TIMEOUT_MS", "1000")],
        &["queues"],
    )
    .await;
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("127.0.0.1:1"), "{}", stderr(&out));
}
