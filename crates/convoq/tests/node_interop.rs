//! Interop with real Node BullMQ (the `interop/` folder's `bullmq.mjs`): the `convoq` binary on a
//! Redis queue URL and a fresh key prefix, and Node's `Queue`, `QueueEvents` and `Worker` on the
//! same prefix.
//!
//! - A Node producer adds `create_conversation` jobs exactly as the old Express route did, convoq
//!   runs them, and Node's `QueueEvents` sees them completed with convoq's return value.
//! - A job added through convoq's HTTP API is run by a Node `Worker`, and convoq reads its result.
//! - A job that fails in convoq (unknown user) looks failed to Node, with its reason and
//!   `attemptsMade`.
//!
//! Needs `CONVOQ_TEST_REDIS_URL`, `node` on the path and `interop/node_modules` (`npm ci` in
//! `interop/`); without any of them each test says why it is skipped.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{expect_ok, free_port, get, request};

/// What a test needs: the Redis URL and the `interop/` folder.
struct Env {
    url: String,
    interop: PathBuf,
}

fn env() -> Option<Env> {
    let Some(url) = std::env::var("CONVOQ_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        println!("skipped: CONVOQ_TEST_REDIS_URL is not set");
        return None;
    };
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    if !interop.join("node_modules/bullmq/package.json").exists() {
        println!(
            "skipped: {} has no node_modules (run npm ci there)",
            interop.display()
        );
        return None;
    }
    if Command::new("node").arg("--version").output().is_err() {
        println!("skipped: node is not installed");
        return None;
    }
    Some(Env { url, interop })
}

/// A fresh key prefix whose keys are deleted when the test ends.
struct Prefix {
    url: String,
    name: String,
}

impl Prefix {
    fn new(url: &str) -> Self {
        Prefix {
            url: url.to_owned(),
            name: format!("cqtest-{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}:*", self.name));
        let _ = std::thread::spawn(move || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(url)?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).exec(&mut conn)?;
            }
            Ok(())
        })
        .join();
    }
}

/// A `convoq` process on a temporary store and the Redis queue; killed when dropped.
struct Convoq {
    port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Convoq {
    async fn start(url: &str, prefix: &str, workers: bool) -> Convoq {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let log = dir.path().join("convoq.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoq"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CONVOQ_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("serve");
        if !workers {
            cmd.arg("--no-workers");
        }
        cmd.current_dir(dir.path())
            .env("CONVOQ_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CONVOQ_DATABASE_URL",
                format!("sqlite://{}", dir.path().join("convoq.db").display()),
            )
            .env("CONVOQ_QUEUE_URL", url)
            .env("CONVOQ_QUEUE_PREFIX", prefix)
            .env("CONVOQ_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")));
        let child = cmd.spawn().expect("spawn convoq");
        let mut server = Convoq {
            port,
            child,
            log,
            _dir: dir,
        };
        for _ in 0..200 {
            if let Ok(r) = get(port, "/readyz").await {
                if r.status == 200 {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("convoq exited ({status}): {}", server.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("convoq not ready in 20 s: {}", server.logs());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn put_user(&self, id: &str) {
        let body = json!({ "discordId": "80351110224678912", "username": "alice" });
        let r = request(
            self.port,
            "PUT",
            &format!("/api/users/{id}"),
            &[("Content-Type", "application/json")],
            Some(&body),
        )
        .await
        .expect("PUT user");
        assert!(matches!(r.status, 200 | 201), "{}", r.text());
    }

    /// POSTs a conversation and returns the 202's body.
    async fn post_conversation(&self, user: &str) -> Value {
        let body = json!({ "userId": user, "title": "From the API" });
        let r = request(
            self.port,
            "POST",
            "/api/chat/conversations",
            &[("Content-Type", "application/json")],
            Some(&body),
        )
        .await
        .expect("POST conversation");
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()
    }
}

impl Drop for Convoq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `node bullmq.mjs ARGS` on the prefix and returns its JSON lines.
async fn node(env: &Env, prefix: &str, args: &[&str]) -> Vec<Value> {
    let run = tokio::process::Command::new("node")
        .arg("bullmq.mjs")
        .args(args)
        .current_dir(&env.interop)
        .env("REDIS_URL", &env.url)
        .env("PREFIX", prefix)
        .env("TIMEOUT_MS", "20000")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("node bullmq.mjs {args:?} did not finish in 60 s"))
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node bullmq.mjs {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_producer_jobs_are_run_by_convoq_and_seen_completed_by_queue_events() {
    let Some(env) = env() else { return };
    let prefix = Prefix::new(&env.url);
    let convoq = Convoq::start(&env.url, &prefix.name, true).await;
    convoq.put_user("u1").await;
    let lines = node(&env, &prefix.name, &["produce", "3", "u1"]).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["outcome"], "completed", "{line}\n{}", convoq.logs());
        let rv = &line["returnvalue"];
        assert_eq!(rv["success"], true, "{line}");
        assert!(rv["createdAt"].is_string(), "{line}");
        let cid = rv["conversationId"].as_str().expect("conversationId");
        assert!(uuid::Uuid::parse_str(cid).is_ok(), "{line}");
        assert_eq!(
            &line["fromEvent"], rv,
            "QueueEvents' completed event carries the same return value, as an object"
        );
        let conv = expect_ok(
            get(convoq.port, &format!("/api/chat/conversations/{cid}")).await,
            "the conversation convoq created",
        );
        assert_eq!(conv["conversation"]["title"], format!("Interop {i}"));
        assert_eq!(conv["conversation"]["userId"], "u1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_added_through_convoq_are_run_by_a_node_worker() {
    let Some(env) = env() else { return };
    let prefix = Prefix::new(&env.url);
    let convoq = Convoq::start(&env.url, &prefix.name, false).await;
    let accepted = convoq.post_conversation("u1").await;
    let job_id = accepted["jobId"].as_str().expect("jobId").to_owned();
    let cid = accepted["conversationId"].as_str().expect("conversationId");
    let lines = node(&env, &prefix.name, &["work", "1"]).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let seen = &lines[0];
    assert_eq!(seen["id"], job_id.as_str());
    assert_eq!(seen["name"], "create_conversation");
    assert_eq!(seen["data"]["userId"], "u1");
    assert_eq!(seen["data"]["title"], "From the API");
    assert_eq!(seen["data"]["conversationId"], cid);
    let job = expect_ok(
        get(convoq.port, &format!("/api/jobs/{job_id}?wait=10")).await,
        "the job as convoq reads it",
    );
    assert_eq!(job["job"]["state"], "completed", "{job}");
    assert_eq!(
        job["job"]["result"],
        json!({ "success": true, "conversationId": cid, "processedBy": "node" })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failed_by_convoq_looks_failed_to_node() {
    let Some(env) = env() else { return };
    let prefix = Prefix::new(&env.url);
    let convoq = Convoq::start(&env.url, &prefix.name, true).await;
    let accepted = convoq.post_conversation("ghost").await;
    let job_id = accepted["jobId"].as_str().expect("jobId").to_owned();
    let job = expect_ok(
        get(convoq.port, &format!("/api/jobs/{job_id}?wait=10")).await,
        "the failed job",
    );
    assert_eq!(job["job"]["state"], "failed", "{job}");
    let lines = node(&env, &prefix.name, &["inspect", &job_id]).await;
    let node_view = &lines[0];
    assert_eq!(node_view["state"], "failed", "{node_view}");
    assert_eq!(node_view["attemptsMade"], 1, "{node_view}");
    let reason = node_view["failedReason"].as_str().unwrap_or_default();
    assert!(reason.contains("unknown user \"ghost\""), "{node_view}");
    assert!(node_view["finishedOn"].is_number(), "{node_view}");
    assert_eq!(node_view["data"]["userId"], "ghost");
}
