//! Conversations and users: reads, pagination, and user upserts.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_conversation() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let v = h.create_waited("u1", Some("t")).await;
    let id = v["conversationId"].as_str().unwrap();
    let r = h
        .get(&format!("/api/chat/conversations/{id}"), Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = r.json();
    assert_eq!(c["ok"], json!(true));
    assert_eq!(c["conversation"]["id"], json!(id));
    for k in [
        "userId",
        "title",
        "personalityMode",
        "createdAt",
        "updatedAt",
    ] {
        assert!(c["conversation"].get(k).is_some(), "{k}: {c}");
    }
    let missing = uuid::Uuid::now_v7();
    h.get(&format!("/api/chat/conversations/{missing}"), Some(SERVICE))
        .await
        .assert_error(404, "not_found", None);
    for bad in ["not-a-uuid", "1", "'%20OR%201=1"] {
        h.get(&format!("/api/chat/conversations/{bad}"), Some(SERVICE))
            .await
            .assert_error(400, "invalid_field", Some("id"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_conversations_are_newest_first_and_paginated() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    h.put_user("u2", "2").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = h.create_waited("u1", Some(&format!("c{i}"))).await;
        ids.push(v["conversationId"].as_str().unwrap().to_owned());
    }
    h.create_waited("u2", None).await;
    let list = |v: &Value| -> Vec<String> {
        v["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let all = h.get("/api/users/u1/conversations", Some(SERVICE)).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text);
    let all = all.json();
    assert_eq!(list(&all), [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    assert_eq!(all["nextCursor"], Value::Null);
    assert_eq!(all["conversations"][0]["title"], json!("c2"));

    let p1 = h
        .get("/api/users/u1/conversations?limit=2", Some(SERVICE))
        .await
        .json();
    assert_eq!(list(&p1), [ids[2].clone(), ids[1].clone()]);
    let cursor = p1["nextCursor"].as_str().expect("a next cursor").to_owned();
    let p2 = h
        .get(
            &format!("/api/users/u1/conversations?limit=2&cursor={cursor}"),
            Some(SERVICE),
        )
        .await
        .json();
    assert_eq!(list(&p2), [ids[0].clone()]);
    assert_eq!(p2["nextCursor"], Value::Null);

    let none = h
        .get("/api/users/nobody/conversations", Some(SERVICE))
        .await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.json()["conversations"], json!([]));

    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("cursor=nope", "cursor"),
    ] {
        h.get(&format!("/api/users/u1/conversations?{q}"), Some(SERVICE))
            .await
            .assert_error(400, "invalid_field", Some(field));
    }
    let r = h
        .get("/api/users/u1/conversations?limit=100", Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let long = "u".repeat(65);
    h.get(&format!("/api/users/{long}/conversations"), Some(SERVICE))
        .await
        .assert_error(400, "invalid_field", Some("userId"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_user_creates_updates_and_conflicts() {
    let h = harness().await;
    let put =
        |id: &str, body: Value| json_req("PUT", &format!("/api/users/{id}"), Some(SERVICE), &body);
    let r = h
        .send(put(
            "u1",
            json!({ "discordId": "111", "username": "alice", "globalName": "Alice" }),
        ))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let u = r.json();
    assert_eq!(u["ok"], json!(true));
    assert_eq!(u["user"]["id"], json!("u1"));
    assert_eq!(u["user"]["discordId"], json!("111"));
    assert_eq!(u["user"]["username"], json!("alice"));
    assert_eq!(u["user"]["globalName"], json!("Alice"));

    let r = h
        .send(put(
            "u1",
            json!({ "discordId": "111", "username": "  alice2 " }),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["user"]["username"], json!("alice2"));
    assert_eq!(r.json()["user"]["globalName"], Value::Null);
    assert_eq!(r.json()["user"]["createdAt"], u["user"]["createdAt"]);

    // Another user with the same Discord id.
    h.send(put("u2", json!({ "discordId": "111", "username": "bob" })))
        .await
        .assert_error(409, "conflict", None);
    let r = h
        .send(put("u2", json!({ "discordId": "222", "username": "bob" })))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    for (body, field) in [
        (json!({ "discordId": "abc", "username": "x" }), "discordId"),
        (json!({ "discordId": "", "username": "x" }), "discordId"),
        (
            json!({ "discordId": "1".repeat(33), "username": "x" }),
            "discordId",
        ),
        (json!({ "discordId": 111, "username": "x" }), "discordId"),
        (json!({ "username": "x" }), "discordId"),
        (json!({ "discordId": "1" }), "username"),
        (json!({ "discordId": "1", "username": "  " }), "username"),
        (
            json!({ "discordId": "1", "username": "a\u{0}b" }),
            "username",
        ),
        (
            json!({ "discordId": "1", "username": "x".repeat(101) }),
            "username",
        ),
        (
            json!({ "discordId": "1", "username": "x", "globalName": 5 }),
            "globalName",
        ),
        (
            json!({ "discordId": "1", "username": "x", "globalName": "a\nb" }),
            "globalName",
        ),
    ] {
        h.send(put("u3", body))
            .await
            .assert_error(400, "invalid_field", Some(field));
    }
    h.send(put(
        "u3",
        json!({ "discordId": "1", "username": "x", "admin": true }),
    ))
    .await
    .assert_error(400, "unknown_field", Some("admin"));
    let long = "u".repeat(65);
    h.send(put(&long, json!({ "discordId": "1", "username": "x" })))
        .await
        .assert_error(400, "invalid_field", Some("id"));
    h.send(
        req("PUT", "/api/users/u3", Some(SERVICE))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"discordId":"1","username":"x"}"#))
            .unwrap(),
    )
    .await
    .assert_error(415, "unsupported_media_type", None);
    h.send(
        req("PUT", "/api/users/u3", Some(SERVICE))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{"))
            .unwrap(),
    )
    .await
    .assert_error(400, "malformed_json", None);
}
