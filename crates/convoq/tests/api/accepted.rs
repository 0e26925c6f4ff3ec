//! `POST /api/chat/conversations`: what is accepted, idempotency and `Prefer: wait`.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_shape_location_and_request_id() {
    let h = harness().await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "title": "t" }),
            &[("x-request-id", "req-abc.123_X")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["status"], json!("queued"));
    let job_id = v["jobId"].as_str().expect("jobId");
    assert!(!job_id.is_empty());
    assert!(is_uuid(
        v["conversationId"].as_str().expect("conversationId")
    ));
    assert_eq!(v["requestId"], json!("req-abc.123_X"));
    assert!(v["estimatedWaitTime"].is_u64(), "{v}");
    assert_eq!(r.header("location"), Some(&*format!("/api/jobs/{job_id}")));
    assert_eq!(r.header("x-request-id"), Some("req-abc.123_X"));
    assert!(r.header("idempotent-replayed").is_none());
    // The Location resolves, and the job carries the request id.
    let j = h.get(r.header("location").unwrap(), Some(SERVICE)).await;
    assert_eq!(j.status, StatusCode::OK, "{}", j.text);
    assert_eq!(j.json()["job"]["requestId"], json!("req-abc.123_X"));
    assert_eq!(j.json()["job"]["queue"], json!("database"));
    assert_eq!(j.json()["job"]["name"], json!("create_conversation"));

    // Without a key, every POST is a new conversation.
    let a = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let b = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    assert_ne!(a["jobId"], b["jobId"]);
    assert_ne!(a["conversationId"], b["conversationId"]);
    assert_ne!(a["requestId"], b["requestId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_only_when_sane() {
    let h = harness().await;
    let max = "r".repeat(128);
    for sane in ["abc", "0190b7f6-6a8e-7cc2-b3c6-0f7d6c1e1a2b", max.as_str()] {
        let r = h
            .send(
                req("GET", "/healthz", None)
                    .header("x-request-id", sane)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.header("x-request-id"), Some(sane));
    }
    let too_long = "r".repeat(129);
    for insane in [
        "has spaces",
        too_long.as_str(),
        "semi;colon",
        "quote\"d",
        "slash/ed",
    ] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1" }),
                &[("x-request-id", insane)],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let echoed = r.header("x-request-id").unwrap();
        assert_ne!(echoed, insane);
        assert!(is_uuid(echoed), "a fresh id: {echoed}");
        assert_eq!(r.json()["requestId"], json!(echoed));
    }
    // Errors carry it too.
    let r = h
        .send(
            req("GET", "/api/queues", None)
                .header("x-request-id", "err-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("x-request-id"), Some("err-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_replays_refuses_reuse_and_is_scoped_per_caller() {
    let h = harness().await;
    let body = json!({ "userId": "u1", "title": "hello" });
    let key = [("idempotency-key", "key-1")];
    let first = h.create(SERVICE, &body, &key).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    let f = first.json();

    let again = h.create(SERVICE, &body, &key).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let a = again.json();
    assert_eq!(a["jobId"], f["jobId"]);
    assert_eq!(a["conversationId"], f["conversationId"]);
    assert_eq!(a["requestId"], f["requestId"], "the original request id");
    assert_eq!(again.header("location"), first.header("location"));

    // The same key with a different body.
    for other in [
        json!({ "userId": "u1", "title": "other" }),
        json!({ "userId": "u2", "title": "hello" }),
        json!({ "userId": "u1", "title": "hello", "personalityMode": "concise" }),
    ] {
        h.create(SERVICE, &other, &key)
            .await
            .assert_error(422, "idempotency_key_reused", None);
    }

    // Another caller with the same key gets its own job.
    let theirs = h.create(SERVICE2, &body, &key).await;
    assert_eq!(theirs.status, StatusCode::ACCEPTED, "{}", theirs.text);
    assert!(theirs.header("idempotent-replayed").is_none());
    let t = theirs.json();
    assert_ne!(t["jobId"], f["jobId"]);
    assert_ne!(t["conversationId"], f["conversationId"]);

    // Still replayed once the job has finished (it failed: u1 does not exist).
    let job = h.wait_job(f["jobId"].as_str().unwrap()).await;
    assert_eq!(job["state"], json!("failed"));
    let late = h.create(SERVICE, &body, &key).await;
    assert_eq!(late.status, StatusCode::ACCEPTED, "{}", late.text);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert_eq!(late.json()["jobId"], f["jobId"]);
}

/// Concurrent PUTs of one new user: exactly one answers 201 (created), the others 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_a_new_user_create_it_once() {
    let h = std::sync::Arc::new(harness().await);
    let puts: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.put_user("u-race", "777").await.status })
        })
        .collect();
    let mut created = 0;
    for p in puts {
        let status = p.await.unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{status}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    assert_eq!(created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_answers_201_with_the_conversation() {
    let h = harness().await;
    let r = h.put_user("u1", "123").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "title": "hi" }),
            &[("prefer", "wait=5"), ("x-request-id", "wait-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.header("preference-applied"), Some("wait"));
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["status"], json!("completed"));
    assert_eq!(v["requestId"], json!("wait-1"));
    let c = &v["conversation"];
    assert_eq!(c["id"], v["conversationId"]);
    assert_eq!(c["userId"], json!("u1"));
    assert_eq!(c["title"], json!("hi"));
    assert_eq!(c["personalityMode"], json!("helpful"));
    assert!(c["createdAt"].is_string());
    // The conversation is readable, and the job completed with it as its result.
    let id = v["conversationId"].as_str().unwrap();
    let g = h
        .get(&format!("/api/chat/conversations/{id}"), Some(SERVICE))
        .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(g.json()["conversation"], *c);
    let job = h.wait_job(v["jobId"].as_str().unwrap()).await;
    assert_eq!(job["state"], json!("completed"));
    assert_eq!(job["result"]["conversationId"], v["conversationId"]);
    // A malformed preference is ignored (RFC 7240): 202.
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1" }),
            &[("prefer", "wait=soon")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// With a worker of the API's own process free, the job runs as it is added (run first): the
/// conversation is readable as soon as the 202 arrives, the job completed with one attempt, and
/// the answer is the contract's 202 all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_a_free_worker_commits_its_conversation_with_its_job() {
    let h = harness().await;
    let r = h.put_user("u1", "123").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = h
        .create(SERVICE, &json!({ "userId": "u1", "title": "now" }), &[])
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let v = r.json();
    assert_eq!(v["status"], json!("queued"));
    let id = v["conversationId"].as_str().unwrap();
    let g = h
        .get(&format!("/api/chat/conversations/{id}"), Some(SERVICE))
        .await;
    assert_eq!(
        g.status,
        StatusCode::OK,
        "committed before the 202: {}",
        g.text
    );
    assert_eq!(g.json()["conversation"]["title"], json!("now"));
    let job_id = v["jobId"].as_str().unwrap();
    let j = h.get(&format!("/api/jobs/{job_id}"), Some(ADMIN)).await;
    let job = &j.json()["job"];
    assert_eq!(job["state"], json!("completed"), "{job}");
    assert_eq!(job["attemptsMade"], json!(1));
    assert_eq!(job["result"]["conversationId"], v["conversationId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_on_an_unknown_user_is_422_job_failed() {
    let h = harness().await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "ghost" }),
            &[("prefer", "wait=5")],
        )
        .await;
    let v = r.assert_error(422, "job_failed", None);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("unknown user"), "{m}");
    assert!(m.contains("ghost"), "{m}");
}
