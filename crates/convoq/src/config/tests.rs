//! The configuration's tests: layering, defaults, and errors that name the setting.

use super::*;

fn load(s: Settings) -> Result<Config, ConfigError> {
    Config::from_layers(s, &toml::Table::new())
}

#[test]
fn defaults_are_the_embedded_default() {
    let c = load(Settings::default()).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.database_url.expose(), DEFAULT_DATABASE_URL);
    assert_eq!(c.queue_url.expose(), DEFAULT_DATABASE_URL);
    assert!(c.protected_mode());
    assert_eq!(c.concurrency["database"], 128);
    assert_eq!(
        c.worker_listen, None,
        "a worker serves no HTTP unless asked"
    );
}

#[test]
fn default_concurrency_follows_where_processors_write() {
    let pg = "postgres://convoq@db.example/convoq";
    let both_pg = load(Settings {
        database_url: Some(pg.into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(both_pg.concurrency["database"], 128);
    assert_eq!(both_pg.concurrency["audit"], 4);
    assert_eq!(both_pg.concurrency["chat"], 4);
    // A queue apart from the store: each slot's insert waits for the store's pool.
    for queue_url in ["redis://127.0.0.1:6379", "sqlite://queue.db"] {
        let apart = load(Settings {
            database_url: Some(pg.into()),
            queue_url: Some(queue_url.into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(apart.concurrency["database"], 32, "{queue_url}");
        assert_eq!(apart.concurrency["audit"], 32, "{queue_url}");
    }
    // An explicit setting wins either way; queues it leaves out keep their default.
    let set = load(Settings {
        concurrency: Some("database=8".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(set.concurrency["database"], 8);
    assert_eq!(set.concurrency["audit"], 4);
}

#[test]
fn errors_name_the_setting_and_hide_secrets() {
    let e = load(Settings {
        listen: Some("nope".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_LISTEN"), "{e}");
    let e = load(Settings {
        worker_listen: Some("9090".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_WORKER_LISTEN"), "{e}");
    let e = load(Settings {
        api_keys: Some("svc:root:supersecretvalue123".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("role must be service or admin"),
        "{e}"
    );
    assert!(!e.to_string().contains("supersecretvalue123"), "{e}");
    let e = load(Settings {
        concurrency: Some("database=0".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_CONCURRENCY"), "{e}");
    for bad_sqlite in [
        "sqlite://",
        "sqlite://x.db?cache=private",
        "sqlite://x%zz.db",
        "sqlite::memory:",
    ] {
        let e = load(Settings {
            database_url: Some(bad_sqlite.into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("CONVOQ_DATABASE_URL"),
            "{bad_sqlite}: {e}"
        );
    }
    let e = load(Settings {
        database_url: Some("mysql://x".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_DATABASE_URL"), "{e}");
}

#[test]
fn redis_queue_urls_take_a_prefix_and_an_eviction_override() {
    let c = load(Settings {
        queue_url: Some("redis://:pw@127.0.0.1:6379/2".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.queue_prefix, DEFAULT_QUEUE_PREFIX);
    assert!(!c.allow_redis_eviction);
    let c = load(Settings {
        queue_url: Some("rediss://redis.internal:6380".into()),
        queue_prefix: Some("convoq".into()),
        allow_redis_eviction: Some("true".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (c.queue_prefix.as_str(), c.allow_redis_eviction),
        ("convoq", true)
    );
    let e = load(Settings {
        queue_prefix: Some("a:b".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_QUEUE_PREFIX"), "{e}");
    let e = load(Settings {
        allow_redis_eviction: Some("maybe".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_ALLOW_REDIS_EVICTION"), "{e}");
}

#[test]
fn flags_override_the_file() {
    let file: toml::Table =
        toml::from_str("listen = \"127.0.0.1:4000\"\nmax_backlog = 5\n").unwrap();
    let c = Config::from_layers(
        Settings {
            listen: Some("127.0.0.1:5000".into()),
            ..Default::default()
        },
        &file,
    )
    .unwrap();
    assert_eq!(c.listen.port(), 5000);
    assert_eq!(c.max_backlog, 5);
    let e = Config::from_layers(Settings::default(), &toml::from_str("lisen = 1").unwrap())
        .unwrap_err();
    assert!(
        e.to_string().contains("\"lisen\""),
        "unknown keys are refused: {e}"
    );
}

#[test]
fn postgres_urls_and_settings() {
    let c = load(Settings {
        database_url: Some("postgres://convoq:pw@db.internal:5432/convoq".into()),
        pg_max_connections: Some("20".into()),
        pg_statement_timeout_ms: Some("5000".into()),
        pg_poll_only: Some("true".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.queue_url, c.database_url, "the queue follows the store");
    assert_eq!(Backend::of(c.queue_url.expose()), Some(Backend::Postgres));
    // Printed, the password is hidden.
    assert!(!format!("{c:?}").contains(":pw@"), "{c:?}");
    assert!(c.database_url.to_string().contains(":***@"));
    assert_eq!(c.pg_max_connections, 20);
    assert_eq!(c.pg_statement_timeout, Duration::from_secs(5));
    assert!(c.pg_poll_only);
    let c = load(Settings {
        queue_url: Some("postgresql://u@h/q".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(Backend::of(c.database_url.expose()), Some(Backend::Sqlite));
    assert_eq!(c.pg_max_connections, DEFAULT_PG_MAX_CONNECTIONS);
    assert!(!c.pg_poll_only);

    let e = load(Settings {
        queue_url: Some("postgres://u:hunter2@h:notaport/q".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("CONVOQ_QUEUE_URL"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = load(Settings {
        queue_url: Some("mysql://u:hunter2@h/q".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("postgres://"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    for (s, name) in [
        (
            Settings {
                pg_max_connections: Some("2".into()),
                ..Default::default()
            },
            "CONVOQ_PG_MAX_CONNECTIONS",
        ),
        (
            Settings {
                pg_statement_timeout_ms: Some("soon".into()),
                ..Default::default()
            },
            "CONVOQ_PG_STATEMENT_TIMEOUT_MS",
        ),
        (
            Settings {
                pg_poll_only: Some("maybe".into()),
                ..Default::default()
            },
            "CONVOQ_PG_POLL_ONLY",
        ),
    ] {
        let e = load(s).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
    }
    let file: toml::Table = toml::from_str(
        "pg_max_connections = 4\npg_statement_timeout_ms = 250\npg_poll_only = true\n",
    )
    .unwrap();
    let c = Config::from_layers(Settings::default(), &file).unwrap();
    assert_eq!(
        (
            c.pg_max_connections,
            c.pg_statement_timeout.as_millis(),
            c.pg_poll_only
        ),
        (4, 250, true)
    );
}

#[test]
fn poll_only_is_a_switch_on_the_command_line() {
    let cli = Cli::try_parse_from(["convoq", "worker", "--pg-poll-only"]).unwrap();
    assert_eq!(cli.settings.pg_poll_only.as_deref(), Some("true"));
    let cli = Cli::try_parse_from(["convoq", "--pg-poll-only=false"]).unwrap();
    assert!(!load(cli.settings).unwrap().pg_poll_only);
    // A bare switch before the subcommand does not swallow it.
    let cli = Cli::try_parse_from(["convoq", "--pg-poll-only", "worker"]).unwrap();
    assert_eq!(cli.command, Some(Command::Worker));
    assert!(load(cli.settings).unwrap().pg_poll_only);
}

#[test]
fn api_keys_parse_with_roles() {
    let c = load(Settings {
        api_keys: Some("bot:service:0123456789abcdef, ops:admin:fedcba9876543210".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.api_keys.len(), 2);
    assert_eq!(c.api_keys[1].role, Role::Admin);
    assert!(!format!("{:?}", c.api_keys).contains("fedcba"));
}

#[test]
fn queue_and_store_share_a_sqlite_file_however_its_url_is_spelled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let a = format!("sqlite://{}", path.display());
    let b = format!("sqlite:{}", path.display());
    let c = format!("sqlite://{}/./x.db", dir.path().display());
    assert!(queue_is_store(&a, &b));
    assert!(queue_is_store(&c, &a));
    assert!(!queue_is_store(
        &a,
        &format!("sqlite://{}/y.db", dir.path().display())
    ));
    assert!(queue_is_store("postgres://u@h/d", "postgres://u@h/d"));
    assert!(!queue_is_store("redis://h", "redis://h"));
}

#[test]
fn the_file_reads_as_the_flags_do() {
    let file: toml::Table = toml::from_str(
        "api_keys = [\"bot:service:0123456789abcdef\"]\n\
         personality_modes = [\"helpful\", \"terse\"]\n\
         concurrency = { database = 7 }\n\
         allow_redis_eviction = \"yes\"\n\
         pg_poll_only = false\n",
    )
    .unwrap();
    let c = Config::from_layers(Settings::default(), &file).unwrap();
    assert_eq!(c.api_keys.len(), 1);
    assert_eq!(c.personality_modes, ["helpful", "terse"]);
    assert_eq!(c.concurrency["database"], 7);
    assert!(
        c.allow_redis_eviction,
        "the file takes the words a flag takes"
    );
    assert!(!c.pg_poll_only);
    for (text, name) in [
        ("concurrency = { nope = 1 }", "CONVOQ_CONCURRENCY"),
        ("personality_modes = [\"a,b\"]", "CONVOQ_PERSONALITY_MODES"),
        ("lease_ms = 1.5", "CONVOQ_LEASE_MS"),
        ("lease_ms = 10", "CONVOQ_LEASE_MS"),
    ] {
        let e =
            Config::from_layers(Settings::default(), &toml::from_str(text).unwrap()).unwrap_err();
        assert!(e.to_string().contains(name), "{text}: {e}");
    }
}

#[test]
fn every_setting_has_one_name_in_three_spellings() {
    for (key, label) in settings::SETTINGS {
        let flag = key.replace('_', "-");
        let var = format!("CONVOQ_{}", key.to_ascii_uppercase());
        assert_eq!(*label, format!("--{flag} ({var})"), "{key}");
    }
}

#[test]
fn help_shows_each_default() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    for needle in [
        "[default: 127.0.0.1:3000]",
        "[default: sqlite://convoq.db]",
        "[default: 5000]",
        "[default: helpful,concise,creative,professional,playful]",
        "CONVOQ_WRITE_TIMEOUT_MS",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}
