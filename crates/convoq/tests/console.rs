//! The operator console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`; skipped with the reason when they are not installed), against the real
//! binary with API keys: an operator logs in with an admin key, watches the counts change as
//! jobs run, pauses and resumes a queue, finds a failed job in the failed list, by its request
//! id and by its id, retries it and watches it complete; every action is in the audit log under the key's name.
//! Screenshots of the run are saved in the test's target directory
//! (`CARGO_TARGET_TMPDIR/console-*.png`), and copied to `CONVOQ_TEST_SCREENSHOTS` when set.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::webdriver::Browser;
use support::{count, open_db, request, Server};

const ADMIN: &str = "fedcba9876543210";
const SERVICE: &str = "0123456789abcdef";
const KEYS: &str = "bot:service:0123456789abcdef,ops:admin:fedcba9876543210";

async fn call(port: u16, method: &str, path: &str, key: &str, body: Option<&Value>) -> Value {
    let auth = format!("Bearer {key}");
    let r = request(port, method, path, &[("authorization", &auth)], body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
    r.json()
}

async fn shoot(browser: &Browser, name: &str) {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("console-{name}.png"));
    browser.screenshot(&path).await;
    if let Some(dir) = std::env::var_os("CONVOQ_TEST_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::copy(&path, Path::new(&dir).join(format!("console-{name}.png")))
            .expect("screenshot copied");
    }
}

/// The page's text of `css`, or null.
const TEXT: &str =
    "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";

async fn text(browser: &Browser, css: &str) -> Value {
    browser.eval(TEXT, json!([css])).await
}

/// Chromium and its driver, or `None` after saying why the test is skipped.
fn chromium_or_skip() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    match Browser::find() {
        Ok(found) => Some(found),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[tokio::test]
async fn an_operator_logs_in_watches_and_acts() {
    let Some((chromium, driver)) = chromium_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("CONVOQ_API_KEYS", KEYS)]).await;
    let port = server.port;
    let browser = Browser::start(&chromium, &driver, &dir.path().join("profile")).await;
    let wait = Duration::from_secs(15);

    // `/` leads to the console, which asks for an admin key.
    browser.goto(&format!("http://127.0.0.1:{port}/")).await;
    browser
        .wait_for(
            "the login form",
            wait,
            "return !document.querySelector('#login').hidden;",
        )
        .await;
    browser.type_into("#key", ADMIN).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_for(
            "the queues after login",
            wait,
            "return !document.querySelector('#app').hidden && !!document.querySelector('#queue-database');",
        )
        .await;
    assert_eq!(text(&browser, "#who").await, json!("logged in as ops"));
    let cookies = browser.eval("return document.cookie;", json!([])).await;
    assert_eq!(cookies, json!(""), "the session cookie is HttpOnly");

    // Counts change as jobs run.
    call(
        port,
        "PUT",
        "/api/users/u1",
        SERVICE,
        Some(&json!({"discordId": "1", "username": "alice"})),
    )
    .await;
    for i in 0..5 {
        let body = json!({ "userId": "u1", "title": format!("t{i}") });
        call(
            port,
            "POST",
            "/api/chat/conversations",
            SERVICE,
            Some(&body),
        )
        .await;
    }
    browser
        .wait_for(
            "five completed in the overview",
            wait,
            "return Number(document.querySelector('#queue-database [data-count=completed]').textContent) >= 5;",
        )
        .await;
    browser
        .wait_for(
            "the latest completions' durations",
            wait,
            "return Number(document.querySelector('#queue-database [data-recent]').dataset.recent) >= 5;",
        )
        .await;
    let read_at = text(&browser, "#read-at").await;
    assert!(
        read_at.as_str().is_some_and(|t| t != "–"),
        "the reading's time is shown: {read_at}"
    );
    shoot(&browser, "overview").await;

    // Pause (with a confirmation) and resume.
    browser
        .click("#queue-database button[data-action=pause]")
        .await;
    browser.accept_dialog().await;
    browser
        .wait_for(
            "the queue shown paused",
            wait,
            "return document.querySelector('#queue-database [data-paused]').dataset.paused === 'true';",
        )
        .await;
    let q = call(port, "GET", "/api/queues/database", ADMIN, None).await;
    assert_eq!(q["queue"]["paused"], json!(true));
    browser
        .click("#queue-database button[data-action=resume]")
        .await;
    browser
        .wait_for(
            "the queue shown running",
            wait,
            "return document.querySelector('#queue-database [data-paused]').dataset.paused === 'false';",
        )
        .await;
    let q = call(port, "GET", "/api/queues/database", ADMIN, None).await;
    assert_eq!(q["queue"]["paused"], json!(false));

    // A job that fails (its user does not exist yet), found in the failed list and by its id.
    let r = call(
        port,
        "POST",
        "/api/chat/conversations",
        SERVICE,
        Some(&json!({ "userId": "late" })),
    )
    .await;
    let id = r["jobId"].as_str().expect("a job id").to_owned();
    let job = call(port, "GET", &format!("/api/jobs/{id}?wait=10"), ADMIN, None).await;
    assert_eq!(job["job"]["state"], json!("failed"));
    browser
        .click("#queue-database button[data-show=failed]")
        .await;
    let listed = format!(
        "return [...document.querySelectorAll('#jobs tbody a')].some(a => a.textContent === {});",
        json!(id)
    );
    browser
        .wait_for("the failed job listed", wait, &listed)
        .await;
    // Found again by its request id, in any state.
    let request_id = job["job"]["requestId"]
        .as_str()
        .expect("a request id")
        .to_owned();
    browser
        .eval(
            "document.querySelector('#jobs-state').value = 'any';",
            json!([]),
        )
        .await;
    browser.type_into("#jobs-q", &request_id).await;
    browser.click("#jobs-form button[type=submit]").await;
    let only = format!(
        "const a = [...document.querySelectorAll('#jobs tbody a')]; return a.length === 1 && a[0].textContent === {};",
        json!(id)
    );
    browser
        .wait_for("the job found by its request id", wait, &only)
        .await;
    browser.type_into("#find-id", &id).await;
    browser.click("#find-form button[type=submit]").await;
    browser
        .wait_for(
            "the job shown failed",
            wait,
            "const d = document.querySelector('#job-fields dd[data-field=state]'); return !!d && d.textContent === 'failed';",
        )
        .await;

    // A bulk action on what a search matches, confirmed: another user's failed job removed.
    let r = call(
        port,
        "POST",
        "/api/chat/conversations",
        SERVICE,
        Some(&json!({ "userId": "nobody" })),
    )
    .await;
    let doomed = r["jobId"].as_str().expect("a job id").to_owned();
    call(
        port,
        "GET",
        &format!("/api/jobs/{doomed}?wait=10"),
        ADMIN,
        None,
    )
    .await;
    browser
        .eval("document.querySelector('#jobs-q').value = '';", json!([]))
        .await;
    browser
        .eval(
            "document.querySelector('#jobs-state').value = 'failed';",
            json!([]),
        )
        .await;
    browser.type_into("#jobs-field", "userId").await;
    browser.type_into("#jobs-value", "nobody").await;
    browser.click("#jobs-form button[type=submit]").await;
    let listed_doomed = format!(
        "const a = [...document.querySelectorAll('#jobs tbody a')]; return a.length === 1 && a[0].textContent === {};",
        json!(doomed)
    );
    browser
        .wait_for("the search's one failed job", wait, &listed_doomed)
        .await;
    browser
        .click("#bulk button[data-bulk=remove][data-scope=matching]")
        .await;
    browser.accept_dialog().await;
    browser
        .wait_for(
            "the bulk removal reported",
            wait,
            "return document.querySelector('#message').textContent === 'removed 1 of 1';",
        )
        .await;
    let r = request(
        port,
        "GET",
        &format!("/api/jobs/{doomed}"),
        &[("authorization", &format!("Bearer {ADMIN}"))],
        None,
    )
    .await
    .expect("GET the removed job");
    assert_eq!(r.status, 404, "removed: {}", r.text());

    // The request id leads to every job of the request, in every queue.
    browser.click("#job-request").await;
    let of_request = format!(
        "return [...document.querySelectorAll('#jobs tbody a')].some(a => a.textContent === {}) \
         && document.querySelector('#jobs-page').textContent.includes('every queue');",
        json!(id)
    );
    browser
        .wait_for("the request's jobs", wait, &of_request)
        .await;

    // The user appears; a retry from the console completes the job, and its history shows it.
    call(
        port,
        "PUT",
        "/api/users/late",
        SERVICE,
        Some(&json!({"discordId": "2", "username": "late"})),
    )
    .await;
    browser.click("#job-retry").await;
    browser
        .wait_for(
            "the retried job shown completed",
            wait,
            "const d = document.querySelector('#job-fields dd[data-field=state]'); return !!d && d.textContent === 'completed';",
        )
        .await;
    browser
        .wait_for(
            "the completion in the job's history",
            wait,
            "return !!document.querySelector('#job-events li[data-kind=completed]');",
        )
        .await;
    shoot(&browser, "job").await;

    // Every action is in the audit log, under the admin key's name.
    let db = open_db(&server.db_path()).await;
    for (event, subject) in [
        ("queue.paused", "database"),
        ("queue.resumed", "database"),
        ("job.retried", id.as_str()),
    ] {
        let n = count(
            &db,
            &format!("SELECT COUNT(*) FROM audit_log WHERE event = '{event}' AND subject_id = '{subject}' AND actor = 'ops'"),
        )
        .await;
        assert_eq!(n, 1, "{event} of {subject} recorded once");
    }
}

/// The API reference page renders the served OpenAPI document in the browser: every
/// operation and schema, with its headers and roles; no key needed.
#[tokio::test]
async fn the_api_reference_page_renders_the_document() {
    let Some((chromium, driver)) = chromium_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[("CONVOQ_API_KEYS", KEYS)]).await;
    let port = server.port;
    let doc = request(port, "GET", "/api/openapi.json", &[], None)
        .await
        .expect("GET /api/openapi.json")
        .json();
    let operations: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().map_or(0, |m| m.len()))
        .sum();
    let browser = Browser::start(&chromium, &driver, &dir.path().join("profile")).await;
    browser
        .goto(&format!("http://127.0.0.1:{port}/api/docs"))
        .await;
    browser
        .wait_for(
            "the operations",
            Duration::from_secs(15),
            "return !!document.querySelector('#op-createConversation');",
        )
        .await;
    let shown = browser
        .eval(
            "return document.querySelectorAll('section.op[id^=op-]').length;",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(operations), "one section per operation");
    let post = text(&browser, "#op-createConversation").await;
    let post = post.as_str().unwrap_or_default();
    for needle in [
        "Idempotency-Key",
        "Prefer",
        "202",
        "429",
        "Retry-After",
        "Location",
        "apiKey (service, admin)",
    ] {
        assert!(
            post.contains(needle),
            "the POST's section lacks {needle}: {post}"
        );
    }
    let job = text(&browser, "#schema-JobView").await;
    assert!(
        job.as_str().unwrap_or_default().contains("attemptsMade"),
        "{job}"
    );
    shoot(&browser, "api-docs").await;
}
