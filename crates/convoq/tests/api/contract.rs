//! The OpenAPI document against the real router: every response of every API test is checked
//! against the document ([`check`], called by `Harness::send`): its status must be documented
//! for the operation, a JSON body must validate against the documented schema (a JSON Schema
//! 2020-12 validator, with undocumented fields refused), another body must carry the
//! documented media type, and the documented headers must be there. The tests below add what
//! the other tests cannot reach: every documented operation is routed, no route is added
//! outside the document, the document is served, and its reference page.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::harness::*;

/// The document as JSON, with every object schema closed (`additionalProperties: false`
/// where it lists properties and says nothing else), so that a field a handler adds without
/// documenting it fails too.
fn contract() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc =
            serde_json::to_value(convoq::http::openapi::document()).expect("the document");
        close_objects(&mut doc["components"]);
        doc
    })
}

fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), json!(false));
            }
            for child in map.values_mut() {
                close_objects(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// The documented operation for a concrete request path, preferring literal segments.
fn operation(method: &str, path: &str) -> Option<(&'static str, &'static Value)> {
    let segments: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, &str, &Value)> = None;
    for (template, item) in contract()["paths"].as_object()? {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut literal = 0;
        let matches = parts.iter().zip(&segments).all(|(t, s)| {
            if t.starts_with('{') && t.ends_with('}') {
                !s.is_empty()
            } else {
                literal += 1;
                t == s
            }
        });
        let Some(op) = item.get(method.to_ascii_lowercase()) else {
            continue;
        };
        if matches && best.is_none_or(|(n, _, _)| literal > n) {
            best = Some((literal, template.as_str(), op));
        }
    }
    best.map(|(_, t, op)| (t, op))
}

fn validator(pointer: &str, schema: &Value) -> Arc<jsonschema::Validator> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(pointer.to_owned())
        .or_insert_with(|| {
            // The schema's `$ref`s point into the document's components.
            let root = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "components": contract()["components"],
                "allOf": [schema],
            });
            Arc::new(
                jsonschema::validator_for(&root)
                    .unwrap_or_else(|e| panic!("{pointer}: not a JSON Schema: {e}")),
            )
        })
        .clone()
}

/// Checks one response against the document (skipped for paths no operation has: the
/// router's 404 and 405 fallbacks).
pub(crate) fn check(method: &str, path: &str, r: &Resp) {
    let Some((template, op)) = operation(method, path) else {
        return;
    };
    let status = r.status.as_u16().to_string();
    let what = format!("{method} {path} ({template}) answered {status}");
    let Some(documented) = op["responses"].get(&status) else {
        panic!(
            "{what}, which the document does not list: {:?}\n{}",
            op["responses"]
                .as_object()
                .map(|m| m.keys().collect::<Vec<_>>()),
            r.text
        );
    };
    for (name, header) in documented["headers"].as_object().into_iter().flatten() {
        let nullable = header["schema"]["type"].is_array();
        if !nullable {
            assert!(
                r.header(name).is_some(),
                "{what} without its documented header {name}"
            );
        }
    }
    let Some(content) = documented["content"].as_object() else {
        return;
    };
    let content_type = r.header("content-type").unwrap_or_default();
    let (media, body) = content
        .iter()
        .find(|(media, _)| content_type.starts_with(media.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "{what} as {content_type:?}; documented: {:?}",
                content.keys().collect::<Vec<_>>()
            )
        });
    if media != "application/json" {
        return;
    }
    let instance: Value = serde_json::from_str(&r.text)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {}", r.text));
    let pointer = format!("{template} {method} {status}");
    let v = validator(&pointer, &body["schema"]);
    let errors: Vec<String> = v
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the body does not match the document's schema:\n  {}\nbody: {}",
        errors.join("\n  "),
        r.text
    );
}

/// Every documented operation reaches a handler (not the 404 or 405 fallback).
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let h = harness().await;
    let paths = contract()["paths"].as_object().expect("paths").clone();
    assert!(paths.len() >= 27, "{} paths", paths.len());
    for (template, item) in &paths {
        let path = template
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let r = h
                .send(
                    req(&method.to_ascii_uppercase(), &path, Some(ADMIN))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                !r.text.contains("no such route"),
                "{method} {path} is documented but not routed: {}",
                r.text
            );
        }
    }
}

/// No route is registered except through the document (`http::routes`): the router's code
/// has no plain axum `.route(`.
#[test]
fn no_route_bypasses_the_document() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read");
                if text.contains(".route(") || text.contains(".nest(") {
                    offenders.push(path.display().to_string());
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "routes added outside the OpenAPI router (use routes!(handler) with #[utoipa::path]): {offenders:?}"
    );
}

/// The document is served without a key, is OpenAPI 3.1, names the headers and security of
/// the contract, and each of its schemas compiles as a JSON Schema.
#[tokio::test]
async fn the_document_is_served_and_complete() {
    let h = harness().await;
    let r = h.get("/api/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let text = r.text.clone();
    for needle in [
        "Idempotency-Key",
        "Prefer",
        "Retry-After",
        "X-Request-Id",
        "Location",
        "Idempotent-Replayed",
        "X-CSRF-Token",
    ] {
        assert!(
            text.contains(needle),
            "the document never mentions {needle}"
        );
    }
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    assert!(schemes.contains_key("apiKey") && schemes.contains_key("consoleSession"));
    let post = &doc["paths"]["/api/chat/conversations"]["post"];
    assert_eq!(
        post["security"][0]["apiKey"],
        json!(["service", "admin"]),
        "roles are the scheme's scopes"
    );
    assert_eq!(
        doc["paths"]["/api/queues"]["get"]["security"][0]["apiKey"],
        json!(["admin"])
    );
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_owned()),
                "{method} {path}: operationId {id} twice"
            );
            for (status, response) in op["responses"].as_object().expect("responses") {
                assert!(
                    response.get("description").is_some(),
                    "{method} {path} {status} undescribed"
                );
                if let Some(schema) = response.pointer("/content/application~1json/schema") {
                    validator(&format!("served {path} {method} {status}"), schema);
                }
            }
        }
    }
}

/// The reference page is served by the binary with its script, nothing from elsewhere.
#[tokio::test]
async fn the_reference_page_is_served_with_its_assets() {
    let h = harness().await;
    let r = h.get("/api/docs", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/html"));
    assert!(r.text.contains("/api/docs.js"), "{}", r.text);
    assert!(
        !r.text.contains("http://") && !r.text.contains("https://"),
        "{}",
        r.text
    );
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let js = h.get("/api/docs.js", None).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(
        js.text.contains("/api/openapi.json"),
        "the page reads the document"
    );
}
