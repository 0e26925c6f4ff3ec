//! The Lua scripts the BullMQ engine runs (BullMQ's own, copied verbatim; and one of convoq's,
//! see `lua/README.md`), and how they are called: `EVALSHA`, falling back to loading the script
//! when Redis does not know it (after a restart, its script cache is empty).

use std::sync::OnceLock;

use redis::aio::ConnectionLike;

/// One script: its source and the SHA-1 digest Redis knows it by.
#[derive(Debug)]
pub(crate) struct Script {
    pub(crate) name: &'static str,
    pub(crate) source: &'static str,
    pub(crate) sha: String,
}

impl Script {
    fn new(name: &'static str, source: &'static str) -> Self {
        Script {
            name,
            source,
            sha: sha1_hex(source.as_bytes()),
        }
    }

    /// An `EVALSHA` of this script with `keys` and `args`, to run alone or in a pipeline.
    pub(crate) fn cmd<K: redis::ToRedisArgs, A: redis::ToRedisArgs>(
        &self,
        keys: &[K],
        args: &[A],
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len());
        for k in keys {
            cmd.arg(k);
        }
        for a in args {
            cmd.arg(a);
        }
        cmd
    }
}

/// Every script the engine runs.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) add_standard: Script,
    pub(crate) add_delayed: Script,
    pub(crate) add_prioritized: Script,
    pub(crate) move_to_active: Script,
    pub(crate) move_to_finished: Script,
    pub(crate) move_to_delayed: Script,
    pub(crate) extend_lock: Script,
    pub(crate) move_to_wait: Script,
    pub(crate) reap_stalled: Script,
}

impl Scripts {
    /// The scripts, built once per process.
    pub(crate) fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            add_standard: Script::new("addStandardJob", include_str!("lua/addStandardJob-9.lua")),
            add_delayed: Script::new("addDelayedJob", include_str!("lua/addDelayedJob-6.lua")),
            add_prioritized: Script::new(
                "addPrioritizedJob",
                include_str!("lua/addPrioritizedJob-9.lua"),
            ),
            move_to_active: Script::new("moveToActive", include_str!("lua/moveToActive-11.lua")),
            move_to_finished: Script::new(
                "moveToFinished",
                include_str!("lua/moveToFinished-14.lua"),
            ),
            move_to_delayed: Script::new("moveToDelayed", include_str!("lua/moveToDelayed-11.lua")),
            extend_lock: Script::new("extendLock", include_str!("lua/extendLock-2.lua")),
            move_to_wait: Script::new(
                "moveJobFromActiveToWait",
                include_str!("lua/moveJobFromActiveToWait-9.lua"),
            ),
            reap_stalled: Script::new("reapStalled", include_str!("lua/reapStalled-8.lua")),
        })
    }

    fn all(&self) -> [&Script; 9] {
        [
            &self.add_standard,
            &self.add_delayed,
            &self.add_prioritized,
            &self.move_to_active,
            &self.move_to_finished,
            &self.move_to_delayed,
            &self.extend_lock,
            &self.move_to_wait,
            &self.reap_stalled,
        ]
    }

    /// Loads every script into Redis's script cache, so that pipelines and transactions of
    /// `EVALSHA` find them.
    pub(crate) async fn load<C: ConnectionLike>(&self, conn: &mut C) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for s in self.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s.source);
        }
        let shas: Vec<String> = pipe.query_async(conn).await?;
        for (s, sha) in self.all().iter().zip(shas) {
            debug_assert_eq!(s.sha, sha, "script {} digest", s.name);
        }
        Ok(())
    }
}

/// Whether Redis answered that it does not know a script.
pub(crate) fn is_noscript(e: &redis::RedisError) -> bool {
    e.code() == Some("NOSCRIPT") || e.to_string().contains("NOSCRIPT")
}

/// The SHA-1 digest Redis names a script by, in lowercase hex.
fn sha1_hex(data: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
