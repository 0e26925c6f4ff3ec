//! The BullMQ engine's own behaviour, beyond the conformance suite: jobs stored exactly as Node
//! BullMQ stores them, BullMQ's custom-id rules, and Redis outages (unreachable at start,
//! killed and restarted underneath a running engine, its script cache lost).
//!
//! The wire-format test needs `CONVOQ_TEST_REDIS_URL`; the outage test starts its own
//! `redis-server` on a free loopback port (skipped, saying so, where there is none).

mod redis;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoq_queue::bullmq::{BullConfig, BullEngine};
use convoq_queue::{Completion, Engine, NewJob, Outcome, QueueError, Queues};
use serde_json::json;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn unreachable_redis_is_unavailable_within_the_connect_timeout() {
    let mut config = BullConfig::new(format!("redis://127.0.0.1:{}", free_port()));
    config.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = BullEngine::connect(config).await.unwrap_err();
    assert!(matches!(err, QueueError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn jobs_are_stored_as_node_bullmq_stores_them() {
    let Some(factory) = redis::factory() else {
        return;
    };
    let prefix = factory.prefixes.create();
    let config = BullConfig::new(factory.prefixes.url()).with_prefix(prefix.clone());
    let engine: Arc<dyn Engine> = BullEngine::connect(config).await.unwrap();
    let queues = Queues::new(engine.clone());
    let data =
        json!({ "userId": "u1", "title": "t", "personalityMode": "helpful", "requestId": "r1" });
    let added = queues
        .add(NewJob::new("database", "create_conversation", data).with_id("conv-1"))
        .await
        .unwrap();
    assert_eq!(added.job.id, "conv-1");

    let client = ::redis::Client::open(factory.prefixes.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:database:conv-1");
    let hget_conn = conn.clone();
    let hget = |field: &'static str| {
        let mut conn = hget_conn.clone();
        let key = key.clone();
        async move {
            ::redis::cmd("HGET")
                .arg(key)
                .arg(field)
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        hget("data").await.as_deref(),
        Some(r#"{"userId":"u1","title":"t","personalityMode":"helpful","requestId":"r1"}"#),
        "data is JSON text in the order given, as JSON.stringify writes it"
    );
    assert_eq!(hget("name").await.as_deref(), Some("create_conversation"));
    let opts: serde_json::Value = serde_json::from_str(&hget("opts").await.unwrap()).unwrap();
    assert_eq!(opts["attempts"], 3);
    assert_eq!(opts["backoff"]["type"], "exponential");
    assert_eq!(opts["backoff"]["jitter"], 0.5);
    assert_eq!(
        opts["removeOnComplete"],
        json!({ "count": 1000, "age": 604800 })
    );
    let waiting: Vec<String> = ::redis::cmd("LRANGE")
        .arg(format!("{prefix}:database:wait"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(waiting, vec!["conv-1".to_owned()]);

    let claimed = engine
        .claim("database", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .jobs
        .pop()
        .unwrap();
    let lock: Option<String> = ::redis::cmd("GET")
        .arg(format!("{key}:lock"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        lock.as_deref(),
        Some(claimed.token.as_str()),
        "the lease is BullMQ's lock"
    );
    let result = json!({ "success": true, "conversationId": "c1" });
    engine
        .finish(
            &claimed,
            Outcome::Completed(Completion::with_result(result)),
        )
        .await
        .unwrap();
    assert_eq!(
        hget("returnvalue").await.as_deref(),
        Some(r#"{"success":true,"conversationId":"c1"}"#),
        "the return value is JSON, not a JSON string"
    );
    assert_eq!(hget("atm").await.as_deref(), Some("1"));

    for bad in ["42", "a:b", "0"] {
        let err = queues
            .add(NewJob::new("database", "x", json!({})).with_id(bad))
            .await
            .unwrap_err();
        assert!(matches!(err, QueueError::Invalid(_)), "{bad}: {err}");
    }
    engine.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_adding_a_job_wakes_this_ones_workers() {
    let Some(factory) = redis::factory() else {
        return;
    };
    let prefix = factory.prefixes.create();
    let config = BullConfig::new(factory.prefixes.url()).with_prefix(prefix);
    let here: Arc<dyn Engine> = BullEngine::connect(config.clone()).await.unwrap();
    let there: Arc<dyn Engine> = BullEngine::connect(config).await.unwrap();
    let mut signal = here.work_signal("q");
    // The listener's first look after connecting rings once; wait for it, then for the add.
    tokio::time::timeout(Duration::from_secs(5), signal.changed())
        .await
        .expect("the listener connects")
        .unwrap();
    signal.borrow_and_update();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queues = Queues::new(there.clone());
    for n in 0..3 {
        let started = Instant::now();
        queues
            .add(NewJob::new("q", "work", json!({ "n": n })))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), signal.changed())
            .await
            .unwrap_or_else(|_| panic!("add {n} did not wake the other engine"))
            .unwrap();
        signal.borrow_and_update();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    here.close().await;
    there.close().await;
}

#[tokio::test]
async fn an_attempt_ends_after_redis_lost_its_script_cache() {
    // A private server: flushing the script cache of a shared one would disturb others.
    let Some(server) = PrivateRedis::start(free_port()) else {
        println!("skipped: redis-server is not installed");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let mut engine = None;
    for _ in 0..50 {
        if let Ok(e) = BullEngine::connect(BullConfig::new(url.clone())).await {
            engine = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let engine: Arc<dyn Engine> = engine.expect("the private redis-server answers");
    let queues = Queues::new(engine.clone());
    add_one(&queues).await.unwrap();
    let lease = Duration::from_secs(30);
    let claimed = engine
        .claim("q", 1, lease)
        .await
        .unwrap()
        .jobs
        .pop()
        .unwrap();
    // As after a restart: Redis no longer knows the scripts by digest.
    let client = ::redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    engine
        .finish_and_claim(
            &claimed,
            Outcome::Completed(Completion::with_result(json!(1))),
            lease,
        )
        .await
        .unwrap();
    assert_eq!(queues.counts("q").await.unwrap().completed, 1);
    engine.close().await;
}

/// A private `redis-server` on a free port, killed when dropped.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> Option<PrivateRedis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(PrivateRedis {
            port,
            child: Some(child),
        })
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn add_one(queues: &Queues) -> Result<String, QueueError> {
    queues
        .add(NewJob::new("q", "work", json!({ "n": 1 })))
        .await
        .map(|a| a.job.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_unavailable_quickly_and_the_engine_recovers() {
    let port = free_port();
    let Some(mut server) = PrivateRedis::start(port) else {
        println!("skipped: redis-server is not installed");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let mut config = BullConfig::new(url.clone());
    config.command_timeout = Duration::from_secs(1);
    config.connect_timeout = Duration::from_secs(2);
    let mut engine = None;
    for _ in 0..50 {
        if let Ok(e) = BullEngine::connect(config.clone()).await {
            engine = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let engine: Arc<dyn Engine> = engine.expect("the private redis-server answers");
    let queues = Queues::new(engine.clone());
    add_one(&queues).await.unwrap();

    server.kill();
    let started = Instant::now();
    let err = add_one(&queues).await.unwrap_err();
    assert!(matches!(err, QueueError::Unavailable(_)), "{err}");
    let err = queues.counts("q").await.unwrap_err();
    assert!(matches!(err, QueueError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "failed within the command timeout: {:?}",
        started.elapsed()
    );

    // A restarted Redis has lost the data (no persistence here) and its script cache: the
    // engine reconnects and loads its scripts again on the first NOSCRIPT.
    let _server = PrivateRedis::start(port).expect("restart redis-server");
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        match add_one(&queues).await {
            Ok(id) => break id,
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, QueueError::Unavailable(_)), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the engine did not recover: {e}"),
        }
    };
    let claimed = engine
        .claim("q", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .jobs;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job.id, id);
    engine.close().await;
}
