//! A `redis-server` of a test's own, for the tests that stop Redis or need settings of their
//! own (`redis_outage.rs`, `redis_settings.rs`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A `redis-server` of the test's own, on a free port, with its data in a temp directory; killed
/// when dropped.
pub struct PrivateRedis {
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
}

impl PrivateRedis {
    /// `None` when `redis-server` cannot be run. Append-only file, fsync at every write.
    pub fn start() -> Option<PrivateRedis> {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// With these `redis-server` settings (persistence, memory policy); `None` when it cannot
    /// be run.
    pub fn start_with(args: &[&str]) -> Option<PrivateRedis> {
        let mut r = PrivateRedis {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn().then_some(r)
    }

    /// Starts the server (again, on the same port and directory).
    pub fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "redis-server still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                self.child = Some(c);
                true
            }
            Err(_) => false,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until the server answers PING (it answers LOADING while it reads its file).
    pub async fn wait_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut c).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not up after {timeout:?}: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: Redis dies at once, with whatever its append-only file holds.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (Redis's graceful shutdown: flush the append-only file, exit), then waits for it.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("redis-server running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM redis-server: {status}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server ignores SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
