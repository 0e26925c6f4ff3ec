//! Start-up refuses a Redis that may evict job keys: a real `redis-server` of the test's own
//! with `maxmemory-policy allkeys-lru` (under which Redis drops keys, jobs included, when
//! memory runs short). `convoq serve` and the operator CLI exit with an error that names the
//! policy and the way out; `CONVOQ_ALLOW_REDIS_EVICTION=true` starts with a warning. Needs
//! `CONVOQ_TEST_REDIS_URL` (the Redis tests' switch) and `redis-server` on the path.

mod support;

use std::time::Duration;

use support::redis::PrivateRedis;

async fn convoq(
    dir: &std::path::Path,
    redis: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_convoq"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVOQ_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("c.db").display()))
        .env("CONVOQ_QUEUE_URL", redis)
        .env("CONVOQ_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied());
    let run = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("convoq ends within 30 s")
        .expect("run convoq")
}

#[tokio::test]
async fn start_up_refuses_a_redis_that_may_evict_jobs() {
    if std::env::var("CONVOQ_TEST_REDIS_URL").map_or(true, |u| u.trim().is_empty()) {
        println!("skipped: CONVOQ_TEST_REDIS_URL is not set");
        return;
    }
    let Some(redis) =
        PrivateRedis::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        println!("skipped: redis-server is not installed");
        return;
    };
    redis.wait_up(Duration::from_secs(10)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redis.url();

    for args in [&["serve"][..], &["queues"][..]] {
        let out = convoq(dir.path(), &url, &[], args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "convoq {args:?} started on an evicting Redis"
        );
        assert!(
            stderr.contains("allkeys-lru") && stderr.contains("noeviction"),
            "the error names the policy and the fix: {stderr}"
        );
    }

    // Accepting the risk starts it, with a warning (checked through the CLI, which exits).
    let out = convoq(
        dir.path(),
        &url,
        &[("CONVOQ_ALLOW_REDIS_EVICTION", "true")],
        &["queues"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("REDIS MAY EVICT JOBS"), "{stderr}");
}
