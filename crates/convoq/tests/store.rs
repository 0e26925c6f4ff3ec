//! The store on each database it runs on: SQLite always, Postgres when
//! `CONVOQ_TEST_POSTGRES_URL` names a server (each test its own database). One body per
//! behaviour, run on both by `on_each_database!`.

#[macro_use]
mod support;

use chrono::{TimeZone, Utc};
use convoq::store::{NewAuditEvent, NewConversation, Store, StoreError, StoreOptions};
use convoq::telemetry::Metrics;
use convoq_queue::sql::{SqlConn, SqliteFile};
use sqlx::Connection;
use support::TestDatabase;

async fn open(url: &str) -> Store {
    Store::connect(url, &StoreOptions::default(), Metrics::new())
        .await
        .expect("store opens")
}

/// A connection of the test's own to the SQLite store at `url`, set up as the queue engine's.
fn sqlite_conn(url: &str) -> rusqlite::Connection {
    SqliteFile::from_url(url)
        .expect("SQLite URL")
        .open()
        .expect("connect")
}

on_each_database!(
    #[tokio::test]
    migrations_are_idempotent_and_concurrent,
    users_upsert_and_conflict,
    a_user_is_known_once_it_exists,
    conversations_insert_once_and_page_newest_first,
    inserts_run_inside_a_callers_transaction,
    group_inserts_are_one_statement_all_or_nothing,
    concurrent_inserts_share_statements_and_each_gets_its_answer,
    every_operation_is_timed,
);

async fn migrations_are_idempotent_and_concurrent(db: TestDatabase) {
    let url = db.url.as_str();
    // Processes that start together migrate once; a second start changes nothing.
    let opened = futures::future::join_all((0..3).map(|_| open(url))).await;
    assert!(opened.iter().all(|s| !s.dialect().is_empty()));
    let again = open(url).await;
    again.ping().await.expect("ping");
}

async fn users_upsert_and_conflict(db: TestDatabase) {
    let url = db.url.as_str();
    let store = open(url).await;
    let (u, created) = store
        .upsert_user("u1", "100", "alice", None)
        .await
        .expect("create");
    assert!(created);
    assert_eq!(u.global_name, None);
    let (u2, created) = store
        .upsert_user("u1", "100", "alice2", Some("Alice"))
        .await
        .expect("update");
    assert!(!created, "an update is not a creation");
    assert_eq!(u2.username, "alice2");
    assert_eq!(u2.global_name.as_deref(), Some("Alice"));
    assert_eq!(u2.created_at, u.created_at, "creation time is kept");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&u2.updated_at).is_ok(),
        "{}",
        u2.updated_at
    );
    let err = store
        .upsert_user("u2", "100", "bob", None)
        .await
        .expect_err("another user has this discord id");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.get_user("u2").await.expect("read"), None);
}

fn conversation(id: &str, user: &str, title: Option<&str>) -> NewConversation {
    NewConversation {
        id: id.to_owned(),
        user_id: user.to_owned(),
        title: title.map(str::to_owned),
        personality_mode: "helpful".to_owned(),
    }
}

async fn a_user_is_known_once_it_exists(db: TestDatabase) {
    let store = open(db.url.as_str()).await;
    assert!(!store.user_exists("u7").await.unwrap());
    // Not remembered as missing: created meanwhile (by another process, say), it is found.
    let other = open(db.url.as_str()).await;
    other.upsert_user("u7", "700", "u7", None).await.unwrap();
    assert!(store.user_exists("u7").await.unwrap());
    assert!(store.user_exists("u7").await.unwrap());
    assert!(!store.user_exists("u8").await.unwrap());
}

async fn conversations_insert_once_and_page_newest_first(db: TestDatabase) {
    let url = db.url.as_str();
    let store = open(url).await;
    store
        .upsert_user("u1", "1", "alice", None)
        .await
        .expect("user");
    let at = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap()
        + chrono::Duration::microseconds(123_456);
    let ids: Vec<String> = (0..5)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            uuid::Uuid::now_v7().to_string()
        })
        .collect();
    for id in &ids {
        let c = conversation(id, "u1", Some("t"));
        store.insert_conversation(&c, at).await.expect("insert");
        // A retried job inserts again: nothing changes.
        store
            .insert_conversation(&c, at)
            .await
            .expect("insert again");
    }
    let got = store
        .get_conversation(&ids[0])
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        got.created_at, "2024-05-06T07:08:09.123Z",
        "UTC, milliseconds"
    );
    assert_eq!(got.title.as_deref(), Some("t"));
    let first = store
        .list_conversations("u1", 3, None)
        .await
        .expect("page 1");
    let rest = store
        .list_conversations("u1", 3, Some(&first[2].id))
        .await
        .expect("page 2");
    let listed: Vec<String> = first.iter().chain(&rest).map(|c| c.id.clone()).collect();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);
    let err = store
        .insert_conversation(&conversation(&ids[0], "ghost", None), at)
        .await;
    assert!(
        err.is_ok(),
        "an existing id is a no-op even for another user"
    );
    let fresh = uuid::Uuid::now_v7().to_string();
    let err = store
        .insert_conversation(&conversation(&fresh, "ghost", None), at)
        .await
        .expect_err("unknown user");
    assert!(
        matches!(&err, StoreError::UnknownUser(u) if u == "ghost"),
        "{err:?}"
    );
}

async fn inserts_run_inside_a_callers_transaction(db: TestDatabase) {
    let url = db.url.as_str();
    let store = open(url).await;
    store
        .upsert_user("u1", "1", "alice", None)
        .await
        .expect("user");
    let now = Utc::now();
    let kept = uuid::Uuid::now_v7().to_string();
    let dropped = uuid::Uuid::now_v7().to_string();
    let audit = |id: &str| NewAuditEvent {
        id: format!("conversation.created:{id}"),
        event: "conversation.created".to_owned(),
        subject_id: id.to_owned(),
        actor: "test".to_owned(),
        request_id: Some("r1".to_owned()),
    };
    for (id, commit) in [(&kept, true), (&dropped, false)] {
        let c = conversation(id, "u1", None);
        let a = audit(id);
        if url.starts_with("sqlite:") {
            let mut conn = sqlite_conn(url);
            conn.execute_batch("BEGIN").expect("begin");
            store
                .insert_conversations_in(SqlConn::Sqlite(&mut conn), &[(&c, now)])
                .await
                .expect("insert");
            store
                .insert_audits_in(SqlConn::Sqlite(&mut conn), &[(&a, now)])
                .await
                .expect("audit");
            let end = if commit { "COMMIT" } else { "ROLLBACK" };
            conn.execute_batch(end).expect("end");
        } else {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query("BEGIN")
                .execute(&mut conn)
                .await
                .expect("begin");
            store
                .insert_conversations_in(SqlConn::Postgres(&mut conn), &[(&c, now)])
                .await
                .expect("insert");
            store
                .insert_audits_in(SqlConn::Postgres(&mut conn), &[(&a, now)])
                .await
                .expect("audit");
            let end = if commit { "COMMIT" } else { "ROLLBACK" };
            sqlx::query(end).execute(&mut conn).await.expect("end");
        }
    }
    assert!(store.get_conversation(&kept).await.expect("read").is_some());
    assert!(store
        .get_conversation(&dropped)
        .await
        .expect("read")
        .is_none());
    let events = store.audit_events_for(&kept).await.expect("audit");
    assert_eq!(
        events,
        vec![(
            "conversation.created".to_owned(),
            "test".to_owned(),
            Some("r1".to_owned())
        )]
    );
    assert!(store
        .audit_events_for(&dropped)
        .await
        .expect("audit")
        .is_empty());
}

/// Several conversations (or audit events) in one call: all inserted, idempotently; one unknown
/// user among them fails the statement and inserts none.
async fn group_inserts_are_one_statement_all_or_nothing(db: TestDatabase) {
    let url = db.url.as_str();
    let store = open(url).await;
    store
        .upsert_user("u1", "1", "alice", None)
        .await
        .expect("user");
    let now = Utc::now();
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let good: Vec<NewConversation> = ids
        .iter()
        .map(|id| conversation(id, "u1", Some("a \"quoted\" title")))
        .collect();
    let events: Vec<NewAuditEvent> = ids
        .iter()
        .map(|id| NewAuditEvent {
            id: format!("conversation.created-{id}"),
            event: "conversation.created".to_owned(),
            subject_id: id.clone(),
            actor: "test".to_owned(),
            request_id: None,
        })
        .collect();
    let stray: Vec<String> = (0..2).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let mixed = [
        conversation(&stray[0], "u1", None),
        conversation(&stray[1], "ghost", None),
    ];
    let good_rows: Vec<_> = good.iter().map(|c| (c, now)).collect();
    let mixed_rows: Vec<_> = mixed.iter().map(|c| (c, now)).collect();
    let audits: Vec<_> = events.iter().map(|e| (e, now)).collect();
    let (first, again, refused, audited) = if url.starts_with("sqlite:") {
        let mut conn = sqlite_conn(url);
        group_inserts(
            &store,
            SqlConn::Sqlite(&mut conn),
            &good_rows,
            &mixed_rows,
            &audits,
        )
        .await
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        group_inserts(
            &store,
            SqlConn::Postgres(&mut conn),
            &good_rows,
            &mixed_rows,
            &audits,
        )
        .await
    };
    first.expect("three new conversations");
    again.expect("inserting them again changes nothing");
    assert!(
        matches!(refused, Err(StoreError::UnknownUser(_))),
        "{refused:?}"
    );
    audited.expect("three audit events");
    for id in &ids {
        let c = store
            .get_conversation(id)
            .await
            .expect("read")
            .expect("row");
        assert_eq!(c.title.as_deref(), Some("a \"quoted\" title"));
        assert_eq!(store.audit_events_for(id).await.expect("audit").len(), 1);
    }
    for id in &stray {
        assert!(store.get_conversation(id).await.expect("read").is_none());
    }
}

type Inserted = Result<(), StoreError>;

/// The calls of `group_inserts_are_one_statement_all_or_nothing`, on either database: `good`
/// twice, `mixed`, then `audits`.
async fn group_inserts(
    store: &Store,
    mut conn: SqlConn<'_>,
    good: &[(&NewConversation, chrono::DateTime<Utc>)],
    mixed: &[(&NewConversation, chrono::DateTime<Utc>)],
    audits: &[(&NewAuditEvent, chrono::DateTime<Utc>)],
) -> (Inserted, Inserted, Inserted, Inserted) {
    (
        store.insert_conversations_in(conn.reborrow(), good).await,
        store.insert_conversations_in(conn.reborrow(), good).await,
        store.insert_conversations_in(conn.reborrow(), mixed).await,
        store.insert_audits_in(conn, audits).await,
    )
}

/// The count of a `convoq_db_query_duration_seconds` series in `text`.
fn timed(text: &str, op: &str) -> u64 {
    let series = format!("convoq_db_query_duration_seconds_count{{operation=\"{op}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Jobs that insert at the same time share statements (one commit for many rows), and each
/// caller still gets its own row's answer: an unknown user fails that insert alone.
async fn concurrent_inserts_share_statements_and_each_gets_its_answer(db: TestDatabase) {
    let url = db.url.as_str();
    let metrics = Metrics::new();
    let store = Store::connect(url, &StoreOptions::default(), metrics.clone())
        .await
        .expect("store opens");
    store
        .upsert_user("u1", "1", "alice", None)
        .await
        .expect("user");
    let at = Utc::now();
    let rows: Vec<NewConversation> = (0..64)
        .map(|i| {
            let user = if i % 16 == 5 { "ghost" } else { "u1" };
            conversation(&uuid::Uuid::now_v7().to_string(), user, None)
        })
        .collect();
    let answers =
        futures::future::join_all(rows.iter().map(|c| store.insert_conversation(c, at))).await;
    for (c, answer) in rows.iter().zip(&answers) {
        let stored = store.get_conversation(&c.id).await.expect("read");
        if c.user_id == "ghost" {
            assert!(
                matches!(answer, Err(StoreError::UnknownUser(u)) if u == "ghost"),
                "{answer:?}"
            );
            assert!(stored.is_none());
        } else {
            answer.as_ref().expect("inserted");
            assert!(stored.is_some(), "{} not stored", c.id);
        }
    }
    let events: Vec<NewAuditEvent> = rows
        .iter()
        .map(|c| NewAuditEvent {
            id: format!("conversation.created-{}", c.id),
            event: "conversation.created".into(),
            subject_id: c.id.clone(),
            actor: "u1".into(),
            request_id: None,
        })
        .collect();
    let answers = futures::future::join_all(events.iter().map(|e| store.insert_audit(e, at))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    for c in &rows {
        let recorded = store.audit_events_for(&c.id).await.expect("read");
        assert_eq!(recorded.len(), 1, "{}", c.id);
    }
    let text = metrics.render();
    assert_eq!(timed(&text, "insert_conversation"), 64);
    assert_eq!(timed(&text, "insert_audit_event"), 64);
    // The failed group is followed by each of its rows alone, hence the allowance.
    let statements = timed(&text, "insert_conversations");
    assert!(
        (1..=64 / 4 + 64).contains(&statements),
        "{statements} statements"
    );
    let statements = timed(&text, "insert_audit_events");
    assert!(
        (1..=64 / 4).contains(&statements),
        "{statements} statements for 64 events"
    );
}

async fn every_operation_is_timed(db: TestDatabase) {
    let url = db.url.as_str();
    let metrics = Metrics::new();
    let store = Store::connect(url, &StoreOptions::default(), metrics.clone())
        .await
        .expect("store opens");
    store.ping().await.expect("ping");
    store
        .upsert_user("u1", "1", "alice", None)
        .await
        .expect("user");
    store.get_user("u1").await.expect("read");
    let text = metrics.render();
    for op in ["migrate", "ping", "upsert_user", "get_user"] {
        let series = format!("convoq_db_query_duration_seconds_count{{operation=\"{op}\"}}");
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
}
