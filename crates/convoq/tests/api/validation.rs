//! `POST /api/chat/conversations`: every validation rule.

use crate::harness::*;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_must_be_json() {
    let h = harness().await;
    let body = br#"{"userId":"u1"}"#.to_vec();
    h.create_raw(None, body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    h.create_raw(Some("text/plain"), body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    h.create_raw(Some("application/x-www-form-urlencoded"), body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    // JSON with parameters, in any case, and the +json suffix are JSON.
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.convoq+json",
    ] {
        let r = h.create_raw(Some(ct), body.clone()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{ct}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_16_kib_is_413() {
    let h = harness().await;
    const LIMIT: usize = 16 * 1024;
    let padded = |len: usize| {
        let mut b = br#"{"userId":"u1"}"#.to_vec();
        b.resize(len, b' ');
        b
    };
    // Exactly the limit is accepted.
    let r = h.create_raw(Some("application/json"), padded(LIMIT)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // One byte over, without a Content-Length (streamed).
    h.create_raw(Some("application/json"), padded(LIMIT + 1))
        .await
        .assert_error(413, "payload_too_large", None);
    // A large body with a declared Content-Length.
    let big = padded(64 * 1024);
    let r = h
        .send(
            req("POST", "/api/chat/conversations", Some(SERVICE))
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, big.len())
                .body(Body::from(big))
                .unwrap(),
        )
        .await;
    r.assert_error(413, "payload_too_large", None);
    // A large title inside a large body is refused for size, not for the title.
    let body = json!({ "userId": "u1", "title": "x".repeat(20_000) });
    h.create(SERVICE, &body, &[])
        .await
        .assert_error(413, "payload_too_large", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_non_objects_are_400() {
    let h = harness().await;
    for body in [
        &b"{"[..],
        b"",
        b"{\"userId\": }",
        b"not json",
        b"{\"userId\":\"u1\"} trailing",
    ] {
        h.create_raw(Some("application/json"), body.to_vec())
            .await
            .assert_error(400, "malformed_json", None);
    }
    for body in [&b"[]"[..], b"\"u1\"", b"null", b"42"] {
        h.create_raw(Some("application/json"), body.to_vec())
            .await
            .assert_error(400, "invalid_body", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_400_naming_the_field() {
    let h = harness().await;
    for (body, field) in [
        (json!({ "userId": "u1", "extra": 1 }), "extra"),
        (json!({ "userId": "u1", "user_id": "u1" }), "user_id"),
        (
            json!({ "userId": "u1", "personality_mode": "helpful" }),
            "personality_mode",
        ),
        (json!({ "userID": "u1" }), "userID"),
    ] {
        let v = h
            .create(SERVICE, &body, &[])
            .await
            .assert_error(400, "unknown_field", Some(field));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_rules() {
    let h = harness().await;
    for body in [
        json!({}),
        json!({ "title": "t" }),
        json!({ "userId": null }),
        json!({ "userId": 42 }),
        json!({ "userId": true }),
        json!({ "userId": ["u1"] }),
        json!({ "userId": { "id": "u1" } }),
        json!({ "userId": "" }),
        json!({ "userId": "x".repeat(65) }),
        json!({ "userId": "é".repeat(65) }),
        json!({ "userId": "a\u{7}b" }),
        json!({ "userId": "a\nb" }),
        json!({ "userId": "a\u{0}b" }),
        json!({ "userId": "a\u{1b}[31mb" }),
        json!({ "userId": "a\u{85}b" }),
    ] {
        let r = h.create(SERVICE, &body, &[]).await;
        let v = r.assert_error(400, "invalid_field", Some("userId"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains("userId"),
            "{body}: {v}"
        );
    }
    // 64 characters (multi-byte ones too) are accepted.
    for id in ["x".repeat(64), "é".repeat(64)] {
        let r = h.create(SERVICE, &json!({ "userId": id }), &[]).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn title_rules() {
    let h = harness().await;
    for title in [
        json!("x".repeat(201)),
        json!("é".repeat(201)),
        json!(format!("  {}  ", "x".repeat(201))),
        json!("a\u{0}b"),
        json!("a\u{7}b"),
        json!("line\nbreak"),
        json!("tab\there"),
        json!("a\u{7f}b"),
        json!(5),
        json!(["t"]),
        json!(false),
    ] {
        let r = h
            .create(SERVICE, &json!({ "userId": "u1", "title": title }), &[])
            .await;
        r.assert_error(400, "invalid_field", Some("title"));
    }
    // 200 characters, surrounding whitespace (trimmed), null and blank are accepted.
    for title in [
        json!("x".repeat(200)),
        json!("é".repeat(200)),
        json!(format!("  {}  ", "x".repeat(200))),
        json!(null),
        json!(""),
        json!("   "),
    ] {
        let r = h
            .create(SERVICE, &json!({ "userId": "u1", "title": title }), &[])
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{title}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personality_mode_rules() {
    let h = harness().await;
    for mode in [
        json!("grumpy"),
        json!(""),
        json!("Helpful"),
        json!(1),
        json!(["helpful"]),
    ] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1", "personalityMode": mode }),
                &[],
            )
            .await;
        let v = r.assert_error(400, "invalid_field", Some("personalityMode"));
        if mode.is_string() {
            assert!(
                v["error"]["message"].as_str().unwrap().contains("helpful"),
                "the message lists the modes: {v}"
            );
        }
    }
    for mode in ["helpful", "concise", "creative", "professional", "playful"] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1", "personalityMode": mode }),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{mode}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_modes_replace_the_default_set() {
    let h = harness_with(Some(KEYS), |s| {
        s.personality_modes = Some("helpful,pirate".into());
    })
    .await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "personalityMode": "pirate" }),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    h.create(
        SERVICE,
        &json!({ "userId": "u1", "personalityMode": "concise" }),
        &[],
    )
    .await
    .assert_error(400, "invalid_field", Some("personalityMode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_values_are_stored_normalised() {
    let h = harness().await;
    let long_user = "u".repeat(64);
    assert_eq!(
        h.put_user(&long_user, "100").await.status,
        StatusCode::CREATED
    );
    // Default mode, trimmed title.
    let v = h.create_waited(&long_user, Some("  hello  ")).await;
    let c = &v["conversation"];
    assert_eq!(c["userId"], json!(long_user));
    assert_eq!(c["title"], json!("hello"));
    assert_eq!(c["personalityMode"], json!("helpful"));
    assert_eq!(c["id"], v["conversationId"]);
    // A blank title is no title.
    let v = h.create_waited(&long_user, Some("   ")).await;
    assert_eq!(v["conversation"]["title"], Value::Null);
    // 200 characters fit.
    let t = "é".repeat(200);
    let v = h.create_waited(&long_user, Some(&t)).await;
    assert_eq!(v["conversation"]["title"], json!(t));
    // An explicit mode.
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": long_user, "personalityMode": "creative", "title": null }),
            &[("prefer", "wait=5")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.json()["conversation"]["personalityMode"],
        json!("creative")
    );
    assert_eq!(r.json()["conversation"]["title"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_must_be_sane() {
    let h = harness().await;
    let body = json!({ "userId": "u1" });
    let long = "k".repeat(256);
    h.create(SERVICE, &body, &[("idempotency-key", &long)])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    h.create(SERVICE, &body, &[("idempotency-key", "")])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    h.create(SERVICE, &body, &[("idempotency-key", "two words")])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    let ok = "k".repeat(255);
    let r = h.create(SERVICE, &body, &[("idempotency-key", &ok)]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// A body that does not arrive within the header read timeout is answered 408
/// `request_timeout`, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_answered_408() {
    let h = harness_with(Some(KEYS), |s| {
        s.header_read_timeout_ms = Some("300".into())
    })
    .await;
    // A body stream that sends one byte and then nothing.
    let stream =
        futures::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from("{")) })
            .chain(futures::stream::pending());
    let started = Instant::now();
    let r = h
        .send(
            req("POST", "/api/chat/conversations", Some(SERVICE))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .unwrap(),
        )
        .await;
    r.assert_error(408, "request_timeout", None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let q = h
        .get("/api/queues/database?fresh=true", Some(ADMIN))
        .await
        .json();
    assert_eq!(q["queue"]["counts"]["waiting"], json!(0), "{q}");
}
